"""Sampling and scoring on Ray (posttrain.cluster): the same shards as one machine, actors
that die mid-shard, and a clear error without Ray.

The Ray tests share one local cluster (2 CPUs, no dashboard, a small object store) started
by this module and shut down after it: Ray's start-up costs about 10 s on 2 cores.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from posttrain import cluster
from posttrain.stages import sample as sample_stage
from posttrain.cluster import ClusterError, ClusterSettings
from posttrain.stages.sample import SampleConfig
from test_sample import LengthReward, make_ctx, read_shards, write_prompts

TESTS = Path(__file__).resolve().parent


# ---- without a cluster -------------------------------------------------------------------


def test_a_cluster_without_ray_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ClusterError, match=r"needs Ray .*requirements/ray.txt"):
        cluster.connect(ClusterSettings())


def test_validate_refuses_a_cluster_without_ray_before_anything_runs(tmp_path, monkeypatch):
    import yaml

    from posttrain.recipe import RecipeError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "models": {"base": "some/model"},
                                    "sample": {"cluster": {"address": "auto", "engines": 2}}}))
    loaded = load_recipe(path)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RecipeError, match=r"r.yaml: sample.cluster: .*needs Ray"):
        loaded.check(files=False)  # what `posttrain validate` and run_round call first


def test_sampling_on_one_machine_never_imports_ray(tmp_path, eot_model_dir, monkeypatch, engines_here):
    monkeypatch.setitem(sys.modules, "ray", None)
    ctx = make_ctx(tmp_path, eot_model_dir, write_prompts(tmp_path / "prompts.jsonl"), LengthReward())
    sample_stage.run(ctx)
    assert len(read_shards(ctx.out_dir)) == 7


def test_cluster_settings_are_strict():
    with pytest.raises(ValueError, match="extra"):
        SampleConfig(cluster={"adress": "auto"})
    with pytest.raises(ValueError, match="engines"):
        SampleConfig(cluster={"engines": 0})
    with pytest.raises(ValueError, match="sample.cluster.engines instead"):
        SampleConfig(cluster={"engines": 2}, vllm={"engines": 2})
    cfg = SampleConfig(cluster={"address": "ray://head:10001", "engines": 4, "placement_strategy": "STRICT_PACK"})
    assert cfg.cluster.engines == 4 and cfg.cluster.reward_actors == 1
    assert SampleConfig().cluster is None  # off by default


def test_eval_runs_engines_with_samplings_settings():
    from posttrain.stages.sample import engine_options

    cfg = SampleConfig(dtype="float32", vllm={"tensor_parallel_size": 4, "engines": 2, "gpu_memory_utilization": 0.5})
    opts = engine_options(cfg, device="cpu", trust_remote_code=True)
    assert (opts.tensor_parallel_size, opts.engines, opts.gpu_memory_utilization) == (4, 2, 0.5)
    assert (opts.dtype, opts.device, opts.trust_remote_code) == ("float32", "cpu", True)


# ---- a pool whose actors die, without Ray (what run_queue does with what Ray tells it) ----------


class _Died(Exception):
    """What Ray raises for a task whose actor died (its text as Ray 2.60 words it)."""

    def __init__(self, name: str, pid: int, detail: str):
        super().__init__()
        self.preempted = self.actor_init_failed = False
        self.error_msg = (f"The actor died unexpectedly before finishing this task.\n\tclass_name: GenerationWorker\n"
                          f"\tactor_id: ab12\n\tpid: {pid}\n\tname: {name}\n\tnamespace: x\n\tip: 10.0.0.{pid % 9}\n"
                          f"The actor is dead because its worker process has died. {detail}")

    def __str__(self):
        return self.error_msg


class _FakeRay:
    """ray.wait/ray.get over refs whose outcome `fate(actor, task)` decides: a value, or _Died."""

    class exceptions:
        RayActorError = _Died
        ActorUnavailableError = _Died

    def __init__(self, fate):
        self.fate, self.sent = fate, []

    def call(self, actor, task):
        self.sent.append((actor, task))
        return (actor, task)

    def wait(self, refs, num_returns, timeout):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        outcome = self.fate(*ref)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


SIGKILLED = ("Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error "
             "code 2. End of file.")


def test_a_dead_actors_task_goes_to_a_live_one_and_the_death_is_one_line(caplog):
    import logging

    dead: list[str] = []

    def fate(actor, task):
        if task == "t2" and not dead:  # the first actor handed t2 dies running it
            dead.append(actor)
            return _Died("posttrain-generate-7-1", 4242, SIGKILLED)
        return f"{task} by {actor}"

    ray = _FakeRay(fate)
    with caplog.at_level(logging.WARNING, logger="posttrain.cluster"):
        done = dict(cluster.run_queue(ray, ["a0", "a1"], ["t1", "t2", "t3", "t4"], ray.call, "generation (x)",
                                      label=lambda t: f"job {t}"))
    assert sorted(done) == ["t1", "t2", "t3", "t4"]  # nothing lost
    assert done["t2"] != f"t2 by {dead[0]}"
    sent_dead = ray.sent.index((dead[0], "t2"))
    assert dead[0] not in [a for a, _ in ray.sent[sent_dead + 1:]]  # never used again
    assert len(ray.sent) == 5  # t2 was sent twice, every other task once
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("generation (x): actor posttrain-generate-7-1 (pid 4242, on node 10.0.0.3) died: its "
                           "process died without an error (SIGKILL")
    assert line.endswith("; its task (job t2) goes to the 1 live actor(s) (retry 1 of 2)")


def test_a_task_that_kills_every_actor_it_reaches_stops_at_the_retry_bound():
    def fate(actor, task):
        return _Died(f"posttrain-generate-{actor}", 100 + int(actor[1:]), SIGKILLED) if task == "poison" else task

    ray = _FakeRay(fate)
    with pytest.raises(ClusterError, match=r"its task \(poison\) has now lost 2 actors, so it is likely what kills"):
        list(cluster.run_queue(ray, [f"a{i}" for i in range(5)], ["poison", "ok"], ray.call, "generation (x)",
                               retries=1))
    assert [t for _, t in ray.sent].count("poison") == 2  # tried twice (1 retry), 3 actors still alive


@pytest.mark.parametrize("detail, cause", [
    (SIGKILLED, "its process died without an error (SIGKILL"),
    ("Task was killed due to the node running low on memory. OutOfMemoryError", "Ray's memory monitor killed it"),
    ("The actor is dead because its node has died. Node Id: 12", "its node died"),
    ("Worker exit type: INTENDED_USER_EXIT Worker exit detail: The actor is dead because it was killed by `ray.kill`",
     "it was stopped by ray.kill"),
])
def test_what_killed_an_actor_is_said_in_words(detail, cause):
    assert cluster.death_cause(_Died("n", 1, detail)).startswith(cause)


# ---- on a local Ray cluster --------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False,
             # the actors import this test module's reward, and this worktree's posttrain
             runtime_env={"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


# write_prompts' 7 sampled prompts in shards of 2: [p0 p1] [p2 p3] [p4 sys] [own-system]; the
# third shard mixes two capabilities (two settings groups), so 5 generation jobs.
N_JOBS = 5
CLUSTER = {"address": "auto", "engines": 2, "cpus_per_engine": 1, "cpus_per_reward": 1}


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory, eot_model_dir):
    """The single-machine path's shards (engine in a child process), the reference."""
    tmp = tmp_path_factory.mktemp("local")
    ctx = make_ctx(tmp, eot_model_dir, write_prompts(tmp / "prompts.jsonl"), LengthReward())
    sample_stage.run(ctx)
    return read_shards(ctx.out_dir), (ctx.out_dir / "top1.jsonl").read_text()


@pytest.fixture(scope="module")
def eot_model_dir(tmp_path_factory, tiny_tokenizer):
    from posttrain.modeling import save_checkpoint
    from test_generation import eot_prone_model

    out = tmp_path_factory.mktemp("cluster") / "model"
    return save_checkpoint(eot_prone_model(tiny_tokenizer, eot_push=1.5), tiny_tokenizer, out)


def killing(monkeypatch, ray, at_calls: set[int]):
    """Wrap cluster.run_queue so that the actor handed the Nth generation task (N in at_calls)
    is killed with SIGKILL right after the task is sent: it dies mid-shard, as a crashed node
    would. Returns the calls made, (actor id, task)."""
    real = cluster.run_queue
    calls: list[tuple[str, tuple]] = []

    def run_queue(ray_, actors, tasks, call, what, **kwargs):
        if not what.startswith("generation"):
            return real(ray_, actors, tasks, call, what, **kwargs)
        pids = {a._actor_id.hex(): ray_.get(a.where.remote())["pid"] for a in actors}

        def deadly_call(actor, task):
            ref = call(actor, task)
            calls.append((actor._actor_id.hex(), task))
            if len(calls) in at_calls:
                os.kill(pids[actor._actor_id.hex()], signal.SIGKILL)
            return ref

        return real(ray_, actors, tasks, deadly_call, what, **kwargs)

    monkeypatch.setattr(cluster, "run_queue", run_queue)
    return calls


@pytest.mark.slow
def test_two_actors_give_the_same_shards_as_one_machine(tmp_path, eot_model_dir, ray_cluster, local_shards):
    expected_rows, expected_top1 = local_shards
    ctx = make_ctx(tmp_path, eot_model_dir, write_prompts(tmp_path / "prompts.jsonl"), LengthReward(),
                   cluster=CLUSTER)
    result = sample_stage.run(ctx)
    assert read_shards(ctx.out_dir) == expected_rows  # same prompts, seeds and backend: same samples and scores
    assert (ctx.out_dir / "top1.jsonl").read_text() == expected_top1
    assert result.metrics["backend"] == "transformers"
    # the reward was set up and used in its actor, never here
    assert ctx.reward.events == [] and ctx.reward.calls == 0
    # every actor was stopped when its work was done
    assert not [a for a in ray_cluster.util.list_named_actors() if a.startswith("posttrain-")]


@pytest.mark.slow
def test_an_actor_killed_mid_shard_loses_nothing(tmp_path, eot_model_dir, ray_cluster, local_shards, monkeypatch,
                                                 caplog):
    import logging
    import re

    calls = killing(monkeypatch, ray_cluster, at_calls={2})
    ctx = make_ctx(tmp_path, eot_model_dir, write_prompts(tmp_path / "prompts.jsonl"), LengthReward(),
                   cluster=CLUSTER)
    with caplog.at_level(logging.WARNING, logger="posttrain.cluster"):
        sample_stage.run(ctx)
    # one line for the death: the actor by name, pid and node, what killed it, where its task went
    (line,) = [r.getMessage() for r in caplog.records if "died" in r.getMessage()]
    assert re.fullmatch(r"generation \(transformers\): actor posttrain-generate-\S+ \(pid \d+, on node \S+\) died: "
                        r"its process died without an error \(SIGKILL.*\); its task \(\S+, prompts \d+-\d+\) goes to "
                        r"the 1 live actor\(s\) \(retry 1 of 2\)", line), line
    # the killed actor's task went again to the survivor, which did the rest; every other task ran once
    actors, tasks = [a for a, _ in calls], [t for _, t in calls]
    assert len(set(actors)) == 2 and len(calls) == N_JOBS + 1 and len(set(tasks)) == N_JOBS
    assert tasks.count(calls[1][1]) == 2 and actors[2:].count(actors[1]) == 0
    assert read_shards(ctx.out_dir) == local_shards[0]


@pytest.mark.slow
def test_every_actor_killed_keeps_finished_work_and_the_rerun_completes(tmp_path, eot_model_dir, ray_cluster,
                                                                        local_shards, monkeypatch):
    calls = killing(monkeypatch, ray_cluster, at_calls={3, 4})
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    ctx = make_ctx(tmp_path, eot_model_dir, prompts, LengthReward(), cluster=CLUSTER)
    with pytest.raises(ClusterError, match=r"actor posttrain-generate-\S+ \(pid \d+, on node \S+\) died: its process "
                                         r"died without an error \(SIGKILL.*no actor is left for its task "
                                         r"\(.*\).*run again"):
        sample_stage.run(ctx)
    work = ctx.out_dir / "samples" / ".work"
    # the two tasks sent before the kills finished and are on disk; the two killed ones are not
    finished = sorted(p.name for p in work.glob("shard_*.json"))
    assert len(calls) == 4 and len(finished) == 2

    monkeypatch.undo()
    calls = killing(monkeypatch, ray_cluster, at_calls=set())  # counts, kills nothing
    sample_stage.run(make_ctx(tmp_path, eot_model_dir, prompts, LengthReward(), cluster=CLUSTER))
    assert len(calls) == N_JOBS - len(finished)  # the finished jobs were not generated again
    assert read_shards(ctx.out_dir) == local_shards[0]


@pytest.mark.slow
def test_reward_pool_scores_as_the_reward_does_here(ray_cluster):
    from posttrain.reward import checked_score

    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(7)]
    responses = ["a" * i for i in range(5)] + ["1 starts with a digit", "twelve chars"]
    with cluster.scoring(LengthReward(), ClusterSettings(reward_actors=2)) as score:
        assert score(prompts, responses, [{}] * 7) == checked_score(LengthReward(), prompts, responses)


class BrokenReward:
    name = "broken"

    def score(self, prompts, responses):
        raise ValueError("no score today")


@pytest.mark.slow
def test_a_reward_error_on_the_cluster_is_the_rewards_error(ray_cluster):
    from posttrain.reward import RewardError

    # raised as the reward's error (naming it), not retried as if an actor had died
    with pytest.raises(RewardError, match="reward 'broken' raised ValueError: no score today"):
        with cluster.scoring(BrokenReward(), ClusterSettings()) as score:
            score([[{"role": "user", "content": "q"}]], ["a"], [{}])


@pytest.mark.slow
def test_eval_generation_on_the_cluster_equals_this_machine(tmp_path, eot_model_dir, ray_cluster, tiny_tokenizer):
    """Evaluation calls generation.generate (one job); on the cluster it gives the same samples."""
    from posttrain import generation
    from posttrain.engines import TransformersGenerator
    from posttrain.jobs import SamplingSettings
    from test_generation import encode_prompts, eot_id

    ids = encode_prompts(tiny_tokenizer)
    settings = SamplingSettings(k=2, temperature=1.0, max_new_tokens=10, seed=3,
                                stop_token_ids=(eot_id(tiny_tokenizer),))
    here = TransformersGenerator(eot_model_dir).generate(ids, settings)  # in this process
    there = generation.generate(eot_model_dir, ids, settings, backend="transformers", workdir=tmp_path,
                                cluster=ClusterSettings(engines=2))
    assert there == here and len(there) == len(ids)
