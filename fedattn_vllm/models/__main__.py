import sys

from fedattn_vllm.models.cli import main

sys.exit(main())
