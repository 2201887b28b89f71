"""Reproductions of the Glow literature's experiments, one command each.

    python -m glowfast.experiments NAME [NAME ...] [--config tiny|small|full] [--data-dir data] [--out DIR]
                                   [--device auto] [--backend auto] [--steps N] [--time-limit S]
                                   [--cache DIR] [--checkpoint PATH] [--alpha 0.99] [--cifar]
                                   [--amp none|bf16] [--channels-last]

NAME: ablation-permutation, ablation-coupling, samples, interpolation, attributes, ood, typicality, all.
Each writes PNG figures, results.json and results.md (command, git commit, device, torch version, date) to
``--out`` (one NAME; default ``results/NAME``) or to ``--out/NAME`` (several NAMEs or ``all``; default
``results``). Trained models are cached under ``--cache`` (default: ``models/`` beside the experiment
folders), keyed by their full spec, so experiments 2-6 share one class-conditional model and ``all`` trains
each model once. ``--checkpoint`` uses a given model (a cache folder/file of this package, or a glowfast
checkpoint holding ``model`` + ``config``) as the shared model instead of training one. ``--amp bf16`` and
``--channels-last`` run every model's coupling networks in bf16 autocast / NHWC (glowfast.amp; part of each
model's spec, so of its cache name).

Configs: ``tiny`` (CPU smoke test, seconds; falls back to scikit-learn's 8x8 digits + synthetic OOD sets
when MNIST is not under ``--data-dir``), ``small`` (a few minutes per model on a 2-core CPU), ``full``
(one H100: each command < 10 minutes; MNIST at its native 28x28 with L=2, so bits/dim are per original pixel).
"""

from .cli import EXPERIMENTS, main

__all__ = ["EXPERIMENTS", "main"]
