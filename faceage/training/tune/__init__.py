"""Ray Tune over training runs: one ``TorchTrainer`` per trial, ASHA on val MAE.

Run locally with ``faceage tune --config configs/tune.yaml`` or on a cluster with
``ray job submit --working-dir . -- python -m faceage.tune --config configs/tune.yaml``.

Each trial is a function that builds a training config from the base settings and its sampled
parameters and calls ``faceage.training.driver.run_training`` with Ray Train V2's
``TuneReportCallback``, so the scheduler sees every epoch. The tune folder ``<storage_path>/<name>``
holds one folder per trial (its Train run in ``<trial>/train``), ``results.md``, ``results.csv``,
``val_mae.png`` and ``best_model.pt``, the best trial's exported model file.

- ``plan``: the search settings (``TuneSettings``), its dimensions and the checked ``TunePlan``;
  every mistake in the space ends there, before any trial starts.
- ``results``: the trials' table, its markdown and the best trial's model file.
- ``driver``: the trial function, ASHA, concurrency and ``run_tune``; the ``faceage tune`` command.
"""
