"""The errors a person fixes (a bad recipe, data file, reward target or run state): the CLI
prints them as one message (exit 1), and a stage that fails with one keeps its type. Anything
else is a bug and keeps its traceback (in the run's posttrain.log)."""

from __future__ import annotations

from posttrain.annotate.base import AnnotatorError
from posttrain.averaging import AverageError
from posttrain.launch import LaunchError
from posttrain.data import DataError, DataErrors
from posttrain.modeling import GGUFError
from posttrain.recipe import RecipeError
from posttrain.records import InputsChanged, OutputsDamaged
from posttrain.reward.base import RewardError
from posttrain.runlock import RunLocked
from posttrain.stage import RoundError

USER_ERRORS: tuple[type[BaseException], ...] = (
    RecipeError, RoundError, InputsChanged, FileNotFoundError, FileExistsError, DataError, DataErrors,
    RewardError, AverageError, AnnotatorError, RunLocked, OutputsDamaged, GGUFError, LaunchError)
