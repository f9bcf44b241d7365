"""What a run leaves behind: its run folder, every file written atomically.

- ``atomic``: the atomic writers (JSON, torch, parquet rows) every other writer uses;
- ``run_folder``: the files of a TWA run folder (summary, metrics, coefficients, model, plots);
- ``plots``: the run folder's plots (matplotlib, no display);
- ``console``: what a run prints (log format, progress lines, the results table);
- ``methods``: the registry of the methods a run compares (TWA, the baselines, the soups):
  names, labels, plot styles, costs, members rules, read by the pipelines, the table, the plots, the report;
- ``mixing``: each candidate's share of the TWA model per block (α, mixing.png);
- ``tensorboard``: TensorBoard event files of the stages and sweep trials (report.tensorboard);
- ``export``: a finished run read back (``twa_ray.load_model``, ``twa-ray show`` / ``export``).
"""
