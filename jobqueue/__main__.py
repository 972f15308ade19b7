import sys

from jobqueue.cli.app import main

sys.exit(main())
