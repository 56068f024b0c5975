"""Evaluation of world checkpoints on held-out recorded episodes (`python -m train.eval`).

    split.py      the held-out split and the real clips scored
    metrics.py    PSNR, SSIM, dynamic-region PSNR, frame statistics
    probe.py      the inverse-dynamics probe
    reference.py  model-independent dataset statistics and the probe, cached next to the dataset
    rollout.py    generating frames: the play-time engine, or windowed joint sampling (teacher)
    score.py      every metric of one checkpoint
    report.py     metrics.json, the comparison table, plots and sample videos
"""
