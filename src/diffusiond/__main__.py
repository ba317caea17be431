import sys

from diffusiond.cli import main

sys.exit(main())
