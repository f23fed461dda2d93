"""Reading configs: one loader for every entry point, safe for YAML files from elsewhere."""
from .arguments import add_trust_arguments
from .loader import load_config
from .targets import TargetRefused, is_allowed, resolve_target

__all__ = ["add_trust_arguments", "is_allowed", "load_config", "resolve_target", "TargetRefused"]
