"""Data curation (Llama 3 report, section 4.2.3), the library the `curate` stage calls.

    config.py    the `curate:` recipe section (`CurateConfig`: rules, rm_quality, judge, dedup)
    filters.py   pure filters: rules, RM and judge quality, priority, `curate_rows`, `clean_preferences`
    dedup.py     semantic dedup: k-means and greedy keep under a cosine threshold (FAISS)
    models.py    what the filters ask of models: dialog embeddings, judge prompts

The stage (reading rows, caching model signals, writing outputs) is posttrain.stages.curate.
Nothing is imported here, so the recipe loads its config without the rest.
"""
