import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Keep `--dist loadgroup` grouping by `xdist_group` (make test uses it).

    pytest-xdist (<= 3.8) tells its scheduler an item's group by appending "@group" to the item's
    nodeid through `item._nodeid`; pytest 9.2 keeps the id in `item._id`, so that write is lost and
    every grouped test is scheduled alone (pytest-dev/pytest-xdist#1386): both workers then start
    the same torchrun launch of a case file, each for its half of the cases. Here the suffix is
    written where this pytest keeps the id; where xdist's own write worked it is left alone."""
    result = yield
    if not getattr(config.option, "loadgroup", False):
        return result
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if not names or item.nodeid.endswith(suffix) or not hasattr(item, "_id"):
            continue
        from _pytest.nodeid import NodeId  # pytest >= 9.2: the id is a structured NodeId

        item._id = NodeId.parse(item.nodeid + suffix)
    return result


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group (rank 0 of 1), on one thread: on a shared 2-core machine torch's
    default of one thread per core made one ViT step take minutes instead of 3 s."""
    import torch
    import torch.distributed as dist

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    torch.set_num_threads(threads)

