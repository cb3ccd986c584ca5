import sys

from mipnerf360.cli import main

sys.exit(main())
