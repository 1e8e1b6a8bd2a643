import os
import sys

# Import the package from this checkout (works for worktrees and un-installed clones alike).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
