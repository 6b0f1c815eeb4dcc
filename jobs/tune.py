"""`ray job submit --working-dir . -- python jobs/tune.py [--config FILE.yaml] [--set key=value ...]`

The same entry point as `dermray tune`. Under `ray job submit` it connects
to the cluster the job was submitted to (RAY_ADDRESS is set by Ray); run by hand it starts a local Ray instance.
Prints the same JSON summary line.
"""

import os
import sys

# The job's working directory is the repository root: make the package importable without an install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dermray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
