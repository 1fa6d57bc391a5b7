"""The study loop, one concept per module:

- `samplers`: the one table of samplers (schema, CLI choices, construction);
- `storage`: storage URLs to Optuna storages (SQLite, a journal file, PostgreSQL and other RDBs);
- `store`: the study in its storage: open, resume, requeue, record, the merge-rules version;
- `preflight`: what is checked before anything is written: memory, evaluation assets, the run folder;
- `pools`: the worker pools behind one interface (`inline`, `ray_pool`);
- `progress`: what the driver shows while the study runs;
- `scheduler`: the ask/tell state machine over the pool.

`mergeopt.search.run_study` puts them together: the setup path, top to bottom."""
