"""`python -m llmray_cli ...`: the `llmray` command without its console script."""

import sys

from llmray_cli.main import main

sys.exit(main())
