"""Pipelines: a TOML of stage flags -> the stage graph that `dodo.py` hands to doit.

    from smedjan.pipeline import load_pipelines
    for name, pipe in load_pipelines("pipelines").items():
        for stage in pipe.stages:
            print(name, stage.name, stage.command)
"""

from smedjan.pipeline.config import Pipeline, Stage, load_pipeline, load_pipelines

__all__ = ["Pipeline", "Stage", "load_pipeline", "load_pipelines"]
