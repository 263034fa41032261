import sys

from rsiseg.cli import main

sys.exit(main())
