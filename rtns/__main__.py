import sys

from rtns.cli import main

sys.exit(main())
