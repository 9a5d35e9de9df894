"""The machinery around the algorithm: the command line, loading, data, the run folder, the
teacher check, evaluation, caches and trackers. The algorithm itself is the top level:
sdpg.py, losses.py, rollout.py, verifier.py, config.py, baselines.py."""
