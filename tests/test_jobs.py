"""A run's jobs, made as they are taken (issue 26: a list of every job held ~600 bytes an input for the
whole run): the same jobs, in the same order, with the same resume keys as the list they replace."""
from __future__ import annotations

import gc

import numpy as np

from esegeta.attribution import batching
from esegeta.io import resume
from esegeta.run import plan as planning
from esegeta.run.memory import Releaser
from esegeta.spec import config as config_mod
from helpers_cli import valid_config

SIZES = [8, 8, 12, 8, 12, 12, 8, 12, 8, 8, 8]  # interleaved shapes: a batch waits for inputs further on


def _plan(tmp_path, batch: int):
    folder = tmp_path / "mixed"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for k, size in enumerate(SIZES):
        np.save(folder / f"m{k:02d}.npy", rng.random((size, size), dtype=np.float32))
    methods = [{"id": "captum.Saliency"}, {"id": "captum.IntegratedGradients", "params": {"n_steps": 4}},
               {"id": "captum.FeatureAblation"}]
    cfg = config_mod.parse(valid_config(tmp_path, methods, inputs={"paths": [str(folder)], "spatial_dims": 2},
                                        runtime={"devices": "cpu", "batch_size": batch}))
    return planning.plan(cfg, tmp_path)


def _eager(p, previous):
    """The jobs as the list made before (the code this replaced): per entry, its inputs to compute grouped
    by shape into batches, every job sorted by (first input, entry)."""
    model_hash = resume.model_digest(p.model)
    samples_hash = planning.datasets.samples_digest(p.inputs)
    kept, jobs = {}, []
    for position, e in enumerate(p.entries):
        settings = planning.key_settings(e, p.config)
        settings["samples"] = samples_hash if e.spec.library.reads_samples else None
        todo = []
        for k, item in enumerate(p.inputs):
            key = resume.job_key(settings, model_hash, item.digest)
            record = resume.reusable(previous, e.label, item.name, key)
            if record is not None:
                kept[(k, position)] = {**record, "resumed": True}
            else:
                todo.append((k, item, key))
        one_call = (e.spec.batch_layout != batching.PER_INPUT and e.request.noise_tunnel is None
                    and (e.request.wrapper is None or batching.layout(e.request, 2) != batching.PER_INPUT))
        batch = p.config.runtime.batch_size if (one_call and e.request.patch is None
                                                and e.spec.kind in planning.BATCHABLE_KINDS) else 1
        by_shape = {}
        for t in todo:
            by_shape.setdefault(t[1].shape, []).append(t)
        for same in by_shape.values():
            for start in range(0, len(same), batch):
                group = same[start:start + batch]
                jobs.append((position, [k for k, _, _ in group], [key for _, _, key in group]))
    jobs.sort(key=lambda j: (j[1][0], j[0]))
    return kept, jobs


def test_jobs_made_as_taken_equal_the_list_they_replace(tmp_path):
    for batch in (1, 3):
        p = _plan(tmp_path, batch)
        _, reference = _eager(p, {})
        kept, jobs = planning.jobs(p, {})
        assert not kept and len(jobs) == len(reference) and jobs.results == sum(len(j[1]) for j in reference)
        assert [(j.position, [k for k, _ in j.items], j.keys) for j in jobs] == reference
        assert any(len(j[1]) > 1 for j in reference) == (batch > 1)
        # --resume: records of an earlier run with the right key are kept, one with a wrong key is not
        previous = {}
        for position, ks, keys in reference:
            label = p.entries[position].label
            for k, key in zip(ks, keys):
                if (k + position) % 3 == 0:
                    previous[(label, p.inputs[k].name)] = {"label": label, "input": p.inputs[k].name, "key": key,
                                                           "status": "ok"}
        label = p.entries[0].label
        previous[(label, p.inputs[1].name)] = {"label": label, "input": p.inputs[1].name, "key": "stale",
                                               "status": "ok"}
        kept_before, reference = _eager(p, previous)
        kept, jobs = planning.jobs(p, previous)
        assert kept == kept_before and (1, 0) not in kept
        assert len(jobs) == len(reference) and jobs.results == sum(len(j[1]) for j in reference)
        assert [(j.position, [k for k, _ in j.items], j.keys) for j in jobs] == reference


def test_no_job_exists_before_it_is_taken(tmp_path):
    """The plan's jobs are not a list: a Job object exists from when it is taken (the old list held
    one per (method, input) for the whole run)."""
    p = _plan(tmp_path, 1)

    def alive() -> int:
        gc.collect()
        return sum(type(o) is planning.Job for o in gc.get_objects())

    before = alive()
    _, jobs = planning.jobs(p, {})
    assert len(jobs) == len(SIZES) * 3 and alive() == before
    taken = iter(Releaser().watch(jobs))
    first = next(taken)
    assert first.items[0][0] == 0 and alive() - before <= 3  # one per entry, waiting in the merge
    del first, taken
