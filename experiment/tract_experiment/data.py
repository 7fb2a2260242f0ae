"""Small image datasets as numpy arrays, a batch iterator and augmentation.

Part of the experiment application (``tract-optax-train``), not of the library.

Loaders return a :class:`Dataset` of channels-last ``float32`` images and
``int32`` labels. With ``input_scale='standardized'`` (the default) the images
are standardised with the training set's per-channel mean and standard
deviation (TrAct's absolute ``lam`` assumes inputs of mean 0 and std 1); with
``input_scale='raw'`` they are the stored pixel values as float (0..255 for
Fashion-MNIST and CIFAR-10, 0..16 for digits), and with ``'unit'`` those
divided by that peak (0..1).

- :func:`fashion_mnist`: IDX files (``.gz`` or uncompressed). A ``data_dir``
  given is the only place looked at; without one, ``$TRACT_OPTAX_DATA``, then
  the Debian package's folder, then a download into the user's cache.
- :func:`digits`: scikit-learn's 8x8 digits, split deterministically.
- :func:`cifar10`: the python-pickle batches of CIFAR-10 in a folder.

Every dataset records the files it was read from, with their SHA-256, in
:attr:`Dataset.source`. A missing or damaged file raises
:class:`DatasetError`, naming the file (or folder) and the fault.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
import struct
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from tract_experiment import config as config_lib

PathLike = Union[str, os.PathLike]

#: Environment variable naming a folder that holds datasets.
DATA_ENV_VAR = 'TRACT_OPTAX_DATA'

#: Folders searched for Fashion-MNIST after ``data_dir`` and ``$TRACT_OPTAX_DATA``.
SYSTEM_FASHION_MNIST_DIRS: Tuple[str, ...] = ('/usr/share/datasets/fashion-mnist',)

#: Public locations of the Fashion-MNIST files, tried in order.
FASHION_MNIST_URLS: Tuple[str, ...] = (
    'https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/',
    'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
)

FASHION_MNIST_FILES: Dict[str, str] = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}

FASHION_MNIST_CLASSES: Tuple[str, ...] = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
    'Sneaker', 'Bag', 'Ankle boot')

CIFAR10_FOLDER = 'cifar-10-batches-py'
CIFAR10_TRAIN_FILES: Tuple[str, ...] = tuple(f'data_batch_{i}' for i in range(1, 6))
CIFAR10_TEST_FILE = 'test_batch'

#: Values of ``input_scale`` (see the config module).
INPUT_SCALES: Tuple[str, ...] = config_lib.INPUT_SCALES

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'),
               0x0C: np.dtype('>i4'), 0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


class DatasetError(ValueError):
  """A dataset is missing, or one of its files is damaged.

  The message names the file and what is wrong with it.
  """


@dataclasses.dataclass(frozen=True)
class DataFile:
  """One file a dataset was read from.

  Attributes:
    name: file name inside :attr:`DataSource.folder`.
    sha256: hex SHA-256 of the file's bytes as stored (compressed or not).
    size_bytes: file size.
  """

  name: str
  sha256: str
  size_bytes: int


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Where a dataset was read from.

  Attributes:
    origin: how the folder was chosen: ``'data_dir'``, ``'$TRACT_OPTAX_DATA'``,
      ``'system'``, ``'download'`` or ``'scikit-learn'``.
    folder: the folder holding the files (absolute).
    files: every file read, in reading order.
  """

  origin: str
  folder: str
  files: Tuple[DataFile, ...]

  def to_dict(self) -> Dict[str, object]:
    """A JSON-ready dict: origin, folder and ``files`` as name/sha256/size_bytes."""
    return dataclasses.asdict(self)

  def describe(self) -> str:
    """Lines naming the folder and every file with its SHA-256.

    Example:
      >>> from tract_experiment import data
      >>> source = data.DataSource('data_dir', '/d', (data.DataFile('a.gz', 'ab12', 3),))
      >>> print(source.describe())
      data read from /d (data_dir):
        a.gz  sha256 ab12  (3 bytes)
    """
    lines = [f'data read from {self.folder} ({self.origin}):']
    lines += [f'  {f.name}  sha256 {f.sha256}  ({f.size_bytes} bytes)' for f in self.files]
    return '\n'.join(lines)


def file_sha256(path: PathLike) -> str:
  """Hex SHA-256 of a file's bytes, read in 1 MiB blocks.

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), 'empty')
    >>> open(path, 'wb').close()
    >>> tract_experiment.data.file_sha256(path)[:16]
    'e3b0c44298fc1c14'
  """
  digest = hashlib.sha256()
  with open(path, 'rb') as handle:
    for block in iter(lambda: handle.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _source(origin: str, paths: Sequence[Path]) -> DataSource:
  """The :class:`DataSource` of files that all sit in one folder."""
  folder = paths[0].resolve().parent
  files = []
  for path in paths:
    try:
      files.append(DataFile(path.name, file_sha256(path), path.stat().st_size))
    except OSError as error:
      raise DatasetError(f'Cannot read {path}: {error}.') from error
  return DataSource(origin=origin, folder=str(folder), files=tuple(files))


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test split of an image classification dataset.

  Attributes:
    name: dataset name, e.g. ``'fashion_mnist'``.
    train_images: ``(N, H, W, C)`` float32, standardised.
    train_labels: ``(N,)`` int32 in ``[0, num_classes)``.
    test_images: ``(M, H, W, C)`` float32, standardised with the training
      set's statistics.
    test_labels: ``(M,)`` int32.
    num_classes: number of classes.
    mean: per-channel mean of the raw training pixels that was subtracted
      (zeros for ``input_scale='raw'`` and ``'unit'``).
    std: per-channel divisor: the standard deviation, 1 for ``'raw'``, the
      pixel format's peak for ``'unit'``.
    input_scale: one of :data:`INPUT_SCALES`.
    source: the files the dataset was read from (``None`` when built in memory).
    val_images: ``(V, H, W, C)`` validation images carved from the training
      file by :meth:`split` (empty before), scaled like the training images.
    val_labels: ``(V,)`` int32.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  input_scale: str = 'standardized'
  source: Optional[DataSource] = None
  val_images: Optional[np.ndarray] = None
  val_labels: Optional[np.ndarray] = None

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    """``(H, W, C)`` of one image."""
    return tuple(self.train_images.shape[1:])

  def subset(self, train_examples: Optional[int] = None,
             test_examples: Optional[int] = None, seed: int = 0) -> 'Dataset':
    """A random, class-mixed subset; standardisation is kept as it is.

    Args:
      train_examples: training examples to keep (``None``: all).
      test_examples: test examples to keep (``None``: all).
      seed: seed of the selection.

    Returns:
      A new :class:`Dataset`; the same seed always gives the same subset.

    Example:
      >>> data = tract_experiment.data.digits()
      >>> data.subset(100, 50).train_images.shape
      (100, 8, 8, 1)
    """
    rng = np.random.default_rng(seed)
    return dataclasses.replace(
        self,
        **dict(zip(('train_images', 'train_labels'),
                   _take(rng, self.train_images, self.train_labels, train_examples))),
        **dict(zip(('test_images', 'test_labels'),
                   _take(rng, self.test_images, self.test_labels, test_examples))))


  def split(self, train_examples: Optional[int], val_examples: int,
            test_examples: Optional[int] = None, seed: int = 0) -> 'Dataset':
    """Carves a validation split out of the training data; subsets the rest.

    The training file is shuffled once with ``seed``: its first
    ``val_examples`` examples become the validation split, the next
    ``train_examples`` (``None``: all the rest) the training set, so the two
    never overlap and the test split is never touched (only subset when
    ``test_examples`` is given). Standardisation is kept as loaded.

    Args:
      train_examples: training examples to keep (``None``: every one left).
      val_examples: validation examples (>= 1).
      test_examples: test examples to keep (``None``: all).
      seed: seed of the shuffle; the same seed gives the same split.

    Returns:
      A new :class:`Dataset` with ``val_images`` and ``val_labels`` set.

    Raises:
      SplitError: fewer training examples than ``val_examples`` plus
        ``train_examples``, or more ``test_examples`` than the test split has.

    Example:
      >>> data = tract_experiment.data.digits().split(1000, 200)
      >>> len(data.train_labels), len(data.val_labels), len(data.test_labels)
      (1000, 200, 359)
    """
    available = len(self.train_labels)
    if val_examples < 1:
      raise SplitError(f'--val-examples must be >= 1; got {val_examples}.')
    if val_examples >= available:
      raise SplitError(
          f'--val-examples {val_examples} leaves no training example: {self.name} has '
          f'{available} training examples; use at most {available - 1}.')
    left = available - val_examples
    if train_examples is not None and train_examples > left:
      raise SplitError(
          f'--train-examples {train_examples} is more than the {left} training examples '
          f'{self.name} has left after the {val_examples}-example validation split '
          f'({available} in all); use at most {left}, or "all".')
    if test_examples is not None and test_examples > len(self.test_labels):
      raise SplitError(
          f'--test-examples {test_examples} is more than the {len(self.test_labels)} test '
          f'examples {self.name} has; use at most {len(self.test_labels)}, or "all".')
    rng = np.random.default_rng(seed)
    order = rng.permutation(available)
    val_index = np.sort(order[:val_examples])
    stop = None if train_examples is None else val_examples + train_examples
    train_index = np.sort(order[val_examples:stop])
    test_images, test_labels = _take(rng, self.test_images, self.test_labels, test_examples)
    return dataclasses.replace(
        self, train_images=self.train_images[train_index],
        train_labels=self.train_labels[train_index],
        val_images=self.train_images[val_index], val_labels=self.train_labels[val_index],
        test_images=test_images, test_labels=test_labels)


class SplitError(ValueError):
  """The sizes asked for do not fit the data (the message names the flag to change)."""


def _take(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
          count: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
  if count is None or count >= len(labels):
    return images, labels
  if count < 1:
    raise ValueError(f'A subset needs at least one example; got {count}.')
  index = np.sort(rng.permutation(len(labels))[:count])
  return images[index], labels[index]


def standardize(train_images: np.ndarray, test_images: np.ndarray
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Standardises both splits per channel with the training set's statistics.

  Args:
    train_images: ``(N, H, W, C)`` raw training images (any numeric dtype).
    test_images: ``(M, H, W, C)`` raw test images.

  Returns:
    ``(train, test, mean, std)``, images as float32.

  Example:
    >>> train = np.arange(8, dtype=np.uint8).reshape(2, 2, 2, 1)
    >>> out, _, mean, std = tract_experiment.data.standardize(train, train)
    >>> round(float(out.mean()), 6), round(float(out.std()), 6), mean.tolist()
    (0.0, 1.0, [3.5])
  """
  axes = tuple(range(train_images.ndim - 1))
  mean = train_images.mean(axis=axes, dtype=np.float64)
  std = train_images.std(axis=axes, dtype=np.float64)
  std = np.where(std > 0, std, 1.0)

  def apply(images):
    return ((images.astype(np.float32) - mean.astype(np.float32))
            / std.astype(np.float32))

  return apply(train_images), apply(test_images), mean.astype(np.float32), std.astype(np.float32)


def _pixel_peak(images: np.ndarray) -> float:
  """The largest value the pixel format holds: 255 for uint8, else the data's max.

  Example:
    >>> _pixel_peak(np.zeros((2, 2), np.uint8)), _pixel_peak(np.array([0.0, 16.0]))
    (255.0, 16.0)
  """
  if np.issubdtype(images.dtype, np.integer):
    return float(np.iinfo(images.dtype).max)
  return float(np.max(images)) or 1.0


def _check_input_scale(input_scale: str) -> None:
  if input_scale not in INPUT_SCALES:
    raise ValueError(f'input_scale must be one of {INPUT_SCALES}; got {input_scale!r}.')


def _make_dataset(name: str, train: Tuple[np.ndarray, np.ndarray],
                  test: Tuple[np.ndarray, np.ndarray], num_classes: int,
                  input_scale: str, source: Optional[DataSource]) -> Dataset:
  if input_scale == 'standardized':
    train_images, test_images, mean, std = standardize(train[0], test[0])
  else:
    channels = train[0].shape[-1]
    divisor = _pixel_peak(train[0]) if input_scale == 'unit' else 1.0
    train_images = train[0].astype(np.float32) / np.float32(divisor)
    test_images = test[0].astype(np.float32) / np.float32(divisor)
    mean = np.zeros(channels, np.float32)
    std = np.full(channels, divisor, np.float32)
  return Dataset(name=name, train_images=train_images,
                 train_labels=train[1].astype(np.int32), test_images=test_images,
                 test_labels=test[1].astype(np.int32), num_classes=num_classes,
                 mean=mean, std=std, input_scale=input_scale, source=source)


# ---------------------------------------------------------------- IDX files


def _read_bytes(path: Path) -> bytes:
  """The file's content, decompressed when it is gzip."""
  try:
    with open(path, 'rb') as handle:
      raw = handle.read()
  except OSError as error:
    raise DatasetError(f'Cannot read {path}: {error}.') from error
  if raw[:2] != b'\x1f\x8b':
    if path.suffix == '.gz':
      raise DatasetError(
          f'{path} is not a gzip file (it does not start with the gzip magic '
          'bytes 1f 8b); it is damaged or was saved under the wrong name.')
    return raw
  try:
    return gzip.decompress(raw)
  except EOFError as error:
    raise DatasetError(
        f'{path} is a truncated gzip file (it ends before the compressed stream '
        'does); delete it and download it again.') from error
  except (OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
    raise DatasetError(f'{path} is a corrupt gzip file: {error}.') from error


def read_idx(path: PathLike) -> np.ndarray:
  """Reads an IDX file (the MNIST format), gzip-compressed or not.

  Args:
    path: the file.

  Returns:
    The array, with the dimensions and element type the header declares.

  Raises:
    DatasetError: unreadable file, corrupt or truncated gzip, bad magic number,
      or a payload whose size does not match the header.

  Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'labels-idx1-ubyte')
    >>> with open(path, 'wb') as f:
    ...   _ = f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    >>> tract_experiment.data.read_idx(path).tolist()
    [7, 8, 9]
  """
  path = Path(path)
  content = _read_bytes(path)
  if len(content) < 4:
    raise DatasetError(
        f'{path} is too short ({len(content)} bytes) to hold an IDX header.')
  zero, type_code, ndim = struct.unpack('>HBB', content[:4])
  if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
    raise DatasetError(
        f'{path} has a bad magic number 0x{content[:4].hex()}: an IDX file '
        'starts with two zero bytes, a type code (0x08 for unsigned bytes) and '
        'the number of dimensions. Is this the right file?')
  header_size = 4 + 4 * ndim
  if len(content) < header_size:
    raise DatasetError(
        f'{path} is truncated inside its header ({len(content)} bytes, the '
        f'header of a {ndim}-D IDX file needs {header_size}).')
  shape = struct.unpack(f'>{ndim}I', content[4:header_size])
  dtype = np.dtype(_IDX_DTYPES[type_code])
  expected = int(np.prod(shape)) * dtype.itemsize
  payload = len(content) - header_size
  if payload != expected:
    problem = 'truncated' if payload < expected else 'longer than its header says'
    raise DatasetError(
        f'{path} is {problem}: its header declares shape {shape} '
        f'({expected} bytes of data) but the file holds {payload} bytes.')
  array = np.frombuffer(content, dtype=dtype, offset=header_size).reshape(shape)
  return array.astype(dtype.newbyteorder('='))


def write_idx(path: PathLike, array: np.ndarray) -> None:
  """Writes ``array`` as an IDX file, gzip-compressed if ``path`` ends in .gz.

  Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'x-idx3-ubyte.gz')
    >>> tract_experiment.data.write_idx(path, np.zeros((2, 3, 3), np.uint8))
    >>> tract_experiment.data.read_idx(path).shape
    (2, 3, 3)
  """
  array = np.asarray(array)
  codes = {np.dtype(v).newbyteorder('>'): k for k, v in _IDX_DTYPES.items()}
  big_endian = array.dtype.newbyteorder('>')
  if big_endian not in codes:
    raise ValueError(f'IDX cannot store dtype {array.dtype}.')
  header = struct.pack(f'>HBB{array.ndim}I', 0, codes[big_endian], array.ndim,
                       *array.shape)
  content = header + array.astype(big_endian).tobytes()
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wb') as handle:
    handle.write(content)


def _idx_file(folder: Path, stem: str) -> Optional[Path]:
  for name in (stem + '.gz', stem, stem.replace('-idx', '.idx')):
    if (folder / name).is_file():
      return folder / name
  return None


def _has_fashion_mnist(folder: Path) -> bool:
  return all(_idx_file(folder, stem) for stem in FASHION_MNIST_FILES.values())


def _with_subfolders(folder: Path) -> Tuple[Path, ...]:
  return (folder, folder / 'fashion-mnist', folder / 'fashion_mnist')


def _candidate_dirs(data_dir: Optional[PathLike]) -> Sequence[Tuple[str, Path]]:
  """Where Fashion-MNIST is looked for, in order, each with its origin.

  A ``data_dir`` given is the only candidate (with its subfolders): a run
  never falls back silently to another source than the one asked for.
  """
  if data_dir is not None:
    candidates = [('data_dir', Path(data_dir))]
  else:
    candidates = []
    if os.environ.get(DATA_ENV_VAR):
      candidates.append((f'${DATA_ENV_VAR}', Path(os.environ[DATA_ENV_VAR])))
    candidates.extend(('system', Path(d)) for d in SYSTEM_FASHION_MNIST_DIRS)
  return [(origin, sub) for origin, folder in candidates for sub in _with_subfolders(folder)]


def _find_fashion_mnist(data_dir: Optional[PathLike]) -> Optional[Tuple[str, Path]]:
  for origin, folder in _candidate_dirs(data_dir):
    if _has_fashion_mnist(folder):
      return origin, folder
  return None


def find_fashion_mnist(data_dir: Optional[PathLike] = None) -> Optional[Path]:
  """The folder holding all four Fashion-MNIST IDX files, or None.

  With ``data_dir``, looks there only; without, in ``$TRACT_OPTAX_DATA``, then
  :data:`SYSTEM_FASHION_MNIST_DIRS`. In each folder also in a
  ``fashion-mnist`` or ``fashion_mnist`` subfolder.

  Example:
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for stem in FASHION_MNIST_FILES.values():
    ...   (folder / (stem + '.gz')).touch()
    >>> tract_experiment.data.find_fashion_mnist(folder) == folder
    True
  """
  found = _find_fashion_mnist(data_dir)
  return None if found is None else found[1]


def default_cache_dir() -> Path:
  """``$XDG_CACHE_HOME/tract_optax`` (``~/.cache/tract_optax`` by default)."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return Path(base) / 'tract_optax'


def _download_checked(url: str, target: Path, timeout: float) -> None:
  """Fetches ``url`` into ``target`` if it parses as an IDX file."""
  with urllib.request.urlopen(url, timeout=timeout) as response:
    payload = response.read()
  handle, temporary = tempfile.mkstemp(dir=target.parent, suffix='.gz')
  try:
    with os.fdopen(handle, 'wb') as stream:
      stream.write(payload)
    read_idx(temporary)
    os.replace(temporary, target)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def download_fashion_mnist(folder: PathLike, *, timeout: float = 20.0,
                           urls: Sequence[str] = FASHION_MNIST_URLS) -> Path:
  """Downloads the four Fashion-MNIST files into ``folder``.

  Each file is written to a temporary name, checked with :func:`read_idx` and
  only then moved into place.

  Args:
    folder: destination; created if needed.
    timeout: seconds per connection attempt.
    urls: base URLs tried in order.

  Returns:
    ``folder`` as a Path.

  Raises:
    DatasetError: no base URL delivered a valid file.
  """
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for stem in FASHION_MNIST_FILES.values():
    target = folder / (stem + '.gz')
    if target.is_file():
      continue
    failures = []
    for base in urls:
      try:
        _download_checked(base + stem + '.gz', target, timeout)
        break
      except (OSError, DatasetError) as error:  # URLError is an OSError
        failures.append(f'{base}: {error}')
    else:
      raise DatasetError(f'Could not download {stem}.gz: ' + '; '.join(failures))
  return folder


_FASHION_FILE_LIST = ('train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), '
                      't10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)')


def _check_data_dir(data_dir: PathLike) -> Path:
  folder = Path(data_dir)
  if not folder.exists():
    raise DatasetError(f'The data folder {folder} does not exist.')
  if not folder.is_dir():
    raise DatasetError(f'The data folder {folder} is not a folder.')
  return folder


def _not_found_message(data_dir: Optional[PathLike], download_error: Optional[str]) -> str:
  if data_dir is not None:
    return (f'Fashion-MNIST was not found in {data_dir}: it needs {_FASHION_FILE_LIST} '
            "there or in its 'fashion-mnist' subfolder. Put the four files there, or "
            f'leave the folder out to use ${DATA_ENV_VAR}, the Debian package '
            '(apt-get install dataset-fashion-mnist) or a download.')
  searched = ', '.join(str(folder) for _, folder in _candidate_dirs(None))
  message = f'Fashion-MNIST was not found. Looked for {_FASHION_FILE_LIST} in: {searched}. '
  if download_error:
    message += f'Downloading failed ({download_error}). '
  return message + (
      'Install the Debian package (apt-get install dataset-fashion-mnist), or '
      'put the four files in a folder and pass it as --data-dir (data_dir=...) '
      f'or set ${DATA_ENV_VAR}.')


def fashion_mnist(data_dir: Optional[PathLike] = None, *, download: bool = True,
                  cache_dir: Optional[PathLike] = None,
                  input_scale: str = 'standardized') -> Dataset:
  """Fashion-MNIST: 60k training and 10k test images, 28x28x1, 10 classes.

  Args:
    data_dir: folder with the IDX files. When given it is the only place
      looked at (or its ``fashion-mnist`` subfolder); nothing is downloaded.
    download: without ``data_dir``, if neither ``$TRACT_OPTAX_DATA`` nor the
      system folder has the files, download them into ``cache_dir`` (default
      :func:`default_cache_dir`) when the network allows.
    cache_dir: download destination.
    input_scale: ``'standardized'``, ``'raw'`` (pixels 0..255 as float32) or
      ``'unit'`` (pixels / 255).

  Returns:
    The :class:`Dataset`, with :attr:`Dataset.source` naming the files read.

  Raises:
    DatasetError: ``data_dir`` does not exist or lacks the files, or the files
      are nowhere to be found (the message says how to get them), or a file is
      damaged, or images and labels disagree.

  Example:
    >>> import tempfile
    >>> folder, rng = tempfile.mkdtemp(), np.random.default_rng(0)
    >>> for split, count in (('train', 20), ('t10k', 5)):
    ...   write_idx(f'{folder}/{split}-images-idx3-ubyte.gz',
    ...             rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
    ...   write_idx(f'{folder}/{split}-labels-idx1-ubyte.gz',
    ...             rng.integers(0, 10, count, dtype=np.uint8))
    >>> data = tract_experiment.data.fashion_mnist(folder)
    >>> data.train_images.shape, data.test_labels.dtype, data.source.origin
    ((20, 28, 28, 1), dtype('int32'), 'data_dir')
  """
  _check_input_scale(input_scale)
  if data_dir is not None:
    _check_data_dir(data_dir)
  found = _find_fashion_mnist(data_dir)
  if found is None and download and data_dir is None:
    try:
      found = 'download', download_fashion_mnist(Path(cache_dir or default_cache_dir()))
    except (OSError, DatasetError) as error:
      raise DatasetError(_not_found_message(None, str(error))) from error
  if found is None:
    raise DatasetError(_not_found_message(data_dir, None))
  origin, folder = found
  paths = {key: _idx_file(folder, stem) for key, stem in FASHION_MNIST_FILES.items()}
  arrays = {key: read_idx(path) for key, path in paths.items()}
  splits = []
  for split in ('train', 'test'):
    images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
    image_file, label_file = paths[f'{split}_images'], paths[f'{split}_labels']
    if images.ndim != 3 or labels.ndim != 1:
      raise DatasetError(
          f'{image_file} must hold 3-D images (count, rows, cols) and '
          f'{label_file} 1-D labels; got shapes {images.shape} and {labels.shape}.')
    if len(images) != len(labels):
      raise DatasetError(
          f'{image_file} holds {len(images)} images but {label_file} holds '
          f'{len(labels)} labels.')
    if labels.size and labels.max() >= 10:
      raise DatasetError(f'{label_file} has label {int(labels.max())}; '
                         'Fashion-MNIST labels are 0..9.')
    splits.append((images[..., None], labels))
  source = _source(origin, list(paths.values()))
  return _make_dataset('fashion_mnist', splits[0], splits[1], 10, input_scale, source)


# ------------------------------------------------------------------ digits


#: The file inside scikit-learn that ``load_digits`` reads.
SKLEARN_DIGITS_FILE = 'digits.csv.gz'


def _sklearn_digits_path() -> Path:
  import importlib.resources  # pylint: disable=import-outside-toplevel
  return Path(str(importlib.resources.files('sklearn.datasets.data') / SKLEARN_DIGITS_FILE))


def digits(test_fraction: float = 0.2, seed: int = 0, *,
           input_scale: str = 'standardized') -> Dataset:
  """scikit-learn's 8x8 handwritten digits (1797 images), split deterministically.

  Args:
    test_fraction: share of the images held out as the test set (stratified).
    seed: seed of the split; the same seed gives the same split.
    input_scale: ``'standardized'`` or ``'raw'`` (the stored values 0..16).

  Returns:
    The :class:`Dataset`, images ``(N, 8, 8, 1)``; its source is
    scikit-learn's ``digits.csv.gz``.

  Example:
    >>> data = tract_experiment.data.digits()
    >>> data.train_images.shape, data.test_images.shape, data.num_classes
    ((1438, 8, 8, 1), (359, 8, 8, 1), 10)
    >>> data.source.files[0].name
    'digits.csv.gz'
  """
  _check_input_scale(input_scale)
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  bunch = load_digits()
  images = bunch.images.astype(np.float32)[..., None]
  labels = bunch.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  test_index = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = int(round(test_fraction * len(members)))
    test_index.extend(rng.permutation(members)[:count])
  test_mask = np.zeros(len(labels), bool)
  test_mask[test_index] = True
  source = _source('scikit-learn', [_sklearn_digits_path()])
  return _make_dataset('digits', (images[~test_mask], labels[~test_mask]),
                       (images[test_mask], labels[test_mask]), 10, input_scale, source)


# ----------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickler that rebuilds numpy arrays and plain containers only."""

  _ALLOWED = {
      ('numpy', 'ndarray'), ('numpy', 'dtype'),
      ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
      ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
      ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
      ('_codecs', 'encode'),  # bytes in protocol-2 pickles written by Python 3
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(
          f'refusing to load {module}.{name}: a CIFAR batch holds only a dict '
          'of arrays, lists and strings')
    return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
  try:
    with open(path, 'rb') as handle:
      batch = _ArrayUnpickler(handle, encoding='bytes').load()
  except OSError as error:
    raise DatasetError(f'Cannot read {path}: {error}.') from error
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
          AttributeError, ImportError, KeyError, struct.error) as error:
    raise DatasetError(
        f'{path} is not a valid CIFAR-10 pickle batch ({type(error).__name__}: '
        f'{error}); it is damaged or truncated, download it again.') from error
  if not isinstance(batch, dict):
    raise DatasetError(f'{path} must hold a dict with data and labels; got a '
                       f'{type(batch).__name__}.')
  batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
  if 'data' not in batch or 'labels' not in batch:
    raise DatasetError(f"{path} has no 'data' and 'labels' entries; its keys are "
                       f'{sorted(map(str, batch))}.')
  data = np.asarray(batch['data'])
  try:
    labels = np.asarray(batch['labels'], dtype=np.int64)
  except (TypeError, ValueError) as error:
    raise DatasetError(f'{path} has labels that are not integers: {error}.') from error
  if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
    raise DatasetError(
        f'{path}: data must be uint8 of shape (count, 3072) (32x32 RGB, '
        f'channel-major); got {data.dtype} {data.shape}.')
  if labels.shape != (len(data),):
    raise DatasetError(f'{path} holds {len(data)} images but {labels.size} labels.')
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise DatasetError(f'{path} has labels outside 0..9 '
                       f'(from {labels.min()} to {labels.max()}).')
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels


def _find_cifar10(data_dir: Optional[PathLike]) -> Optional[Tuple[str, Path]]:
  if data_dir is not None:
    roots = [('data_dir', Path(data_dir))]
  elif os.environ.get(DATA_ENV_VAR):
    roots = [(f'${DATA_ENV_VAR}', Path(os.environ[DATA_ENV_VAR]))]
  else:
    roots = []
  for origin, root in roots:
    for folder in (root, root / CIFAR10_FOLDER):
      if all((folder / name).is_file() for name in CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)):
        return origin, folder
  return None


def find_cifar10(data_dir: Optional[PathLike] = None) -> Optional[Path]:
  """The folder with the CIFAR-10 batches, or None.

  ``data_dir`` or its ``cifar-10-batches-py`` subfolder when ``data_dir`` is
  given; otherwise the same under ``$TRACT_OPTAX_DATA``.
  """
  found = _find_cifar10(data_dir)
  return None if found is None else found[1]


def cifar10(data_dir: Optional[PathLike] = None, *,
            input_scale: str = 'standardized') -> Dataset:
  """CIFAR-10 from its python-pickle batches (``data_batch_1..5``, ``test_batch``).

  Args:
    data_dir: folder holding the batches, or holding ``cifar-10-batches-py``
      (as the official ``cifar-10-python.tar.gz`` unpacks); without it,
      ``$TRACT_OPTAX_DATA`` is searched the same way.
    input_scale: ``'standardized'``, ``'raw'`` (pixels 0..255 as float32) or
      ``'unit'`` (pixels / 255).

  Returns:
    The :class:`Dataset`, images ``(N, 32, 32, 3)``.

  Raises:
    DatasetError: ``data_dir`` does not exist, the batches are missing (the
      message says where to get them) or one is damaged.
  """
  _check_input_scale(input_scale)
  if data_dir is not None:
    _check_data_dir(data_dir)
  found = _find_cifar10(data_dir)
  if found is None:
    where = data_dir if data_dir is not None else f'${DATA_ENV_VAR} (--data-dir)'
    raise DatasetError(
        'CIFAR-10 was not found: need data_batch_1..5 and test_batch in '
        f'{where} or its {CIFAR10_FOLDER}/ subfolder. Download '
        'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpack it '
        'and pass the folder as --data-dir.')
  origin, folder = found
  paths = [folder / name for name in CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)]
  train = [_read_cifar_batch(path) for path in paths[:-1]]
  test = _read_cifar_batch(paths[-1])
  train_images = np.concatenate([images for images, _ in train])
  train_labels = np.concatenate([labels for _, labels in train])
  return _make_dataset('cifar10', (train_images, train_labels), test, 10, input_scale,
                       _source(origin, paths))


def _digits_loader(data_dir: Optional[PathLike] = None, *,
                   input_scale: str = 'standardized') -> Dataset:
  if data_dir is not None:
    raise ValueError('digits ships with scikit-learn and takes no data folder; '
                     f'got {data_dir}.')
  return digits(input_scale=input_scale)


#: Loaders by name: ``loader(data_dir=None, *, input_scale='standardized')``.
LOADERS: Dict[str, Callable[..., Dataset]] = {
    'fashion_mnist': fashion_mnist,
    'digits': _digits_loader,
    'cifar10': cifar10,
}

#: Datasets that read files from a folder (``data_dir``).
FOLDER_DATASETS: Tuple[str, ...] = ('fashion_mnist', 'cifar10')


def load(name: str, data_dir: Optional[PathLike] = None, *,
         input_scale: str = 'standardized') -> Dataset:
  """Loads a dataset by name: ``'fashion_mnist'``, ``'digits'`` or ``'cifar10'``.

  Args:
    name: a key of :data:`LOADERS`.
    data_dir: the folder to read from (not for ``'digits'``).
    input_scale: ``'standardized'`` or ``'raw'``.

  Raises:
    ValueError: unknown name or input scale, or a folder for ``'digits'``.
    DatasetError: the files are missing or damaged.

  Example:
    >>> tract_experiment.data.load('digits').num_classes
    10
    >>> float(tract_experiment.data.load('digits', input_scale='raw').train_images.max())
    16.0
  """
  if name not in LOADERS:
    raise ValueError(f'Unknown dataset {name!r}; choose one of {sorted(LOADERS)}.')
  return LOADERS[name](data_dir=data_dir, input_scale=input_scale)


# ------------------------------------------------------ batches, augmentation


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
            seed: Union[None, int, Sequence[int]] = None, drop_remainder: bool = False
            ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Yields ``(images, labels)`` batches, shuffled when ``seed`` is given.

  Args:
    images: ``(N, ...)`` array.
    labels: ``(N,)`` array.
    batch_size: examples per batch.
    seed: shuffle with this seed, an int or a sequence of ints such as
      ``(seed, epoch)`` (``None``: keep the order).
    drop_remainder: skip the last, smaller batch (for training, where a fixed
      shape avoids recompiling).

  Example:
    >>> from tract_experiment.data import batches
    >>> x, y = np.arange(10), np.arange(10)
    >>> [len(b) for b, _ in batches(x, y, 4)]
    [4, 4, 2]
    >>> [len(b) for b, _ in batches(x, y, 4, seed=0, drop_remainder=True)]
    [4, 4]
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1; got {batch_size}.')
  if len(images) != len(labels):
    raise ValueError(f'{len(images)} images but {len(labels)} labels.')
  count = len(labels)
  order = np.arange(count) if seed is None else np.random.default_rng(seed).permutation(count)
  stop = count - count % batch_size if drop_remainder else count
  for start in range(0, stop, batch_size):
    index = order[start:start + batch_size]
    yield images[index], labels[index]


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, *, pad: int = 4,
                     flip: bool = True) -> np.ndarray:
  """Random crops from zero-padded images, and random horizontal flips.

  Vectorised numpy (one gather per batch), cheap enough for a CPU input loop.
  Zero padding is the mean for standardised images, black for raw ones.

  Args:
    images: ``(B, H, W, C)`` batch.
    rng: numpy random generator.
    pad: pixels of zero padding on each side; each crop is offset uniformly
      in ``[-pad, pad]`` (0: no cropping).
    flip: flip each image left-right with probability 1/2.

  Returns:
    A batch of the same shape and dtype.

  Example:
    >>> x = np.arange(2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.float32)
    >>> out = tract_experiment.data.random_crop_flip(x, np.random.default_rng(0), pad=1)
    >>> out.shape
    (2, 4, 4, 1)
  """
  batch, height, width, _ = images.shape
  if pad > 0:
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    top = rng.integers(0, 2 * pad + 1, size=batch)
    left = rng.integers(0, 2 * pad + 1, size=batch)
  else:
    padded, top, left = images, np.zeros(batch, int), np.zeros(batch, int)
  rows = top[:, None] + np.arange(height)[None, :]
  cols = left[:, None] + np.arange(width)[None, :]
  if flip:
    mirrored = rng.random(batch) < 0.5
    cols = np.where(mirrored[:, None], cols[:, ::-1], cols)
  return padded[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]
