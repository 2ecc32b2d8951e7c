"""Command line: ``modalimmune info|...`` (also ``python -m modalimmune``)."""

import argparse
import platform
import sys

import torch

from . import _extension
from .backend import BACKENDS, unavailable_reason


def info_lines():
    """Versions, and for each backend whether it is usable here and, if not, why."""
    module = _extension.load()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda_runtime = torch.version.cuda or "none (CPU build of torch)"
    lines = [
        f"python        {platform.python_version()}",
        f"torch         {torch.__version__} (CUDA {cuda_runtime})",
        f"triton        {triton_version}",
        f"GPU           {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}",
    ]
    if module is not None:
        cuda = module.cuda_version
        built_cuda = f"CUDA {cuda // 1000}.{cuda % 1000 // 10}" if cuda else "no CUDA"
        lines.append(f"extension     modalimmune._C, {module.compiler}, OpenMP {module.openmp}, {built_cuda}")
    else:
        lines.append(f"extension     unusable: {_extension.reason()}")
    lines.append("backends:")
    for name in BACKENDS:
        why = unavailable_reason(name)
        lines.append(f"  {name:7s} {'usable' if why is None else 'unusable: ' + why}")
    return lines


def _info(args):
    print("\n".join(info_lines()))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="modalimmune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and which backends are usable").set_defaults(run=_info)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
