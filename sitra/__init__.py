"""sitra: make transformers smaller by distillation, run as resumable cluster batch jobs."""
import sitra.models  # registers the sitra model classes with transformers' Auto classes
from sitra.version import __version__
