import sys

from mlxkv.cli.main import main

sys.exit(main())
