"""Test-wide settings. The partition start and pull timings are fixed here, before any
pipeline module is imported, so tests do not depend on the shell they run in."""

import os

os.environ["PP_PARTITION_START"] = "2026-11-01-00:00"
os.environ["PP_PULL_CRON"] = "*/5 * * * *"
os.environ["PP_PULL_LAG_SECONDS"] = "60"
os.environ["PP_PULL_CLOSE_SECONDS"] = "900"
os.environ.pop("PP_AUTOMATION", None)
