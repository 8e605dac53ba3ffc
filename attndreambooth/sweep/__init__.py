"""scripts/sweep.py's parts: a cell (`cells`), the cells on this machine (`local`), the cluster launchers'
options (`cluster`) and the cells as cluster jobs (`jobs`)."""
