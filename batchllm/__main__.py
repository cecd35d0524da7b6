import sys

from batchllm.cli import main

sys.exit(main())
