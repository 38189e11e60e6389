import os
import sys
import warnings

# make tests/helpers.py importable from every test directory (and from ddp_spawn children, which inherit sys.path)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
