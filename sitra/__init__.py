"""sitra: make transformers smaller by distillation, run as resumable cluster batch jobs."""
from sitra.version import __version__
import sitra.models  # registers the sitra model classes with transformers' Auto classes
