"""Tests of tract_experiment.data: IDX/CIFAR readers, lookup, sources, batches."""

import gzip
import hashlib
import pickle
import struct

import numpy as np
import pytest

from tract_experiment import data as data_lib

DatasetError = data_lib.DatasetError
STEMS = data_lib.FASHION_MNIST_FILES


def _idx_bytes(array: np.ndarray) -> bytes:
  """IDX encoding of a uint8 array, written independently of data.write_idx."""
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write(path, payload: bytes, compress: bool) -> None:
  path.write_bytes(gzip.compress(payload) if compress else payload)


def _fake_fashion(folder, *, compress=True, train=12, test=5, seed=0):
  """Writes a tiny Fashion-MNIST (random pixels) and returns the raw arrays."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays = {
      'train_images': rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
      'train_labels': rng.integers(0, 10, train, dtype=np.uint8),
      'test_images': rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
      'test_labels': rng.integers(0, 10, test, dtype=np.uint8),
  }
  suffix = '.gz' if compress else ''
  for key, array in arrays.items():
    _write(folder / (STEMS[key] + suffix), _idx_bytes(array), compress)
  return arrays


@pytest.fixture
def no_system_data(monkeypatch):
  """No environment variable and no system folder: only what a test provides."""
  monkeypatch.delenv(data_lib.DATA_ENV_VAR, raising=False)
  monkeypatch.setattr(data_lib, 'SYSTEM_FASHION_MNIST_DIRS', ())


# ------------------------------------------------------------------- IDX


@pytest.mark.parametrize('compress', [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  path = tmp_path / ('x-idx3-ubyte' + ('.gz' if compress else ''))
  _write(path, _idx_bytes(array), compress)
  np.testing.assert_array_equal(data_lib.read_idx(path), array)


@pytest.mark.parametrize('dtype', [np.uint8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize('name', ['a-idx2.gz', 'a-idx2'])
def test_write_idx_roundtrip(tmp_path, dtype, name):
  array = (np.arange(12).reshape(3, 4) * 3).astype(dtype)
  data_lib.write_idx(tmp_path / name, array)
  result = data_lib.read_idx(tmp_path / name)
  assert result.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(result, array)


@pytest.mark.parametrize('compress', [True, False])
def test_read_idx_truncated_payload(tmp_path, compress):
  payload = _idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-100]
  path = tmp_path / ('t-idx3-ubyte' + ('.gz' if compress else ''))
  _write(path, payload, compress)
  with pytest.raises(DatasetError, match=r't-idx3-ubyte.* is truncated: its header declares '
                     r'shape \(4, 28, 28\)'):
    data_lib.read_idx(path)


def test_read_idx_too_long(tmp_path):
  path = tmp_path / 'long-idx1-ubyte'
  path.write_bytes(_idx_bytes(np.zeros(3, np.uint8)) + b'\x00')
  with pytest.raises(DatasetError, match='longer than its header says'):
    data_lib.read_idx(path)


def test_read_idx_truncated_gzip_stream(tmp_path):
  path = tmp_path / 'cut-idx3-ubyte.gz'
  compressed = gzip.compress(_idx_bytes(np.arange(3000, dtype=np.uint8).reshape(3, 1000)))
  path.write_bytes(compressed[:len(compressed) // 2])
  with pytest.raises(DatasetError, match=r'cut-idx3-ubyte.gz is a truncated gzip file'):
    data_lib.read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
  path = tmp_path / 'bad-idx3-ubyte.gz'
  compressed = bytearray(gzip.compress(_idx_bytes(np.zeros((5, 5), np.uint8))))
  compressed[12:20] = b'\xff' * 8  # damage the deflate stream
  path.write_bytes(bytes(compressed))
  with pytest.raises(DatasetError, match=r'bad-idx3-ubyte.gz is a (corrupt|truncated) gzip'):
    data_lib.read_idx(path)


def test_read_idx_gz_name_without_gzip_content(tmp_path):
  path = tmp_path / 'plain-idx1-ubyte.gz'
  path.write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
  with pytest.raises(DatasetError, match='plain-idx1-ubyte.gz is not a gzip file'):
    data_lib.read_idx(path)


@pytest.mark.parametrize('header', [b'\x01\x02\x08\x01', b'\x00\x00\x07\x01', b'\x00\x00\x08\x00',
                                    b'<htm'])
def test_read_idx_bad_magic(tmp_path, header):
  path = tmp_path / 'magic-idx1-ubyte'
  path.write_bytes(header + b'\x00\x00\x00\x01\x05')
  with pytest.raises(DatasetError, match=r'magic-idx1-ubyte has a bad magic number 0x'):
    data_lib.read_idx(path)


def test_read_idx_short_header(tmp_path):
  path = tmp_path / 'short-idx3-ubyte'
  path.write_bytes(b'\x00\x00\x08\x03\x00\x00')
  with pytest.raises(DatasetError, match='truncated inside its header'):
    data_lib.read_idx(path)
  path.write_bytes(b'\x00')
  with pytest.raises(DatasetError, match='too short'):
    data_lib.read_idx(path)


def test_read_idx_missing_file(tmp_path):
  with pytest.raises(DatasetError, match='Cannot read .*nothing-here'):
    data_lib.read_idx(tmp_path / 'nothing-here')


# ---------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize('compress', [True, False])
def test_fashion_mnist_loads_and_standardises(tmp_path, no_system_data, compress):
  arrays = _fake_fashion(tmp_path / 'fm', compress=compress)
  dataset = data_lib.fashion_mnist(tmp_path / 'fm', download=False)
  assert dataset.train_images.shape == (12, 28, 28, 1)
  assert dataset.test_images.shape == (5, 28, 28, 1)
  assert dataset.train_images.dtype == np.float32
  assert dataset.train_labels.dtype == np.int32 and dataset.test_labels.dtype == np.int32
  np.testing.assert_array_equal(dataset.train_labels, arrays['train_labels'])
  assert abs(dataset.train_images.mean()) < 1e-5
  assert abs(dataset.train_images.std() - 1) < 1e-4
  raw = arrays['test_images'].astype(np.float64)
  mean, std = arrays['train_images'].mean(), arrays['train_images'].std()
  np.testing.assert_allclose(dataset.test_images[..., 0], (raw - mean) / std, rtol=1e-5,
                             atol=1e-5)


def test_fashion_mnist_count_mismatch(tmp_path, no_system_data):
  folder = tmp_path / 'fm'
  _fake_fashion(folder)
  _write(folder / (STEMS['train_labels'] + '.gz'), _idx_bytes(np.zeros(11, np.uint8)), True)
  with pytest.raises(DatasetError, match=r'train-images-idx3-ubyte.gz holds 12 images but '
                     r'.*train-labels-idx1-ubyte.gz holds 11 labels'):
    data_lib.fashion_mnist(folder, download=False)


def test_fashion_mnist_label_out_of_range(tmp_path, no_system_data):
  folder = tmp_path / 'fm'
  _fake_fashion(folder)
  _write(folder / (STEMS['test_labels'] + '.gz'), _idx_bytes(np.full(5, 12, np.uint8)), True)
  with pytest.raises(DatasetError, match='has label 12; Fashion-MNIST labels are 0..9'):
    data_lib.fashion_mnist(folder, download=False)


def test_fashion_mnist_wrong_rank(tmp_path, no_system_data):
  folder = tmp_path / 'fm'
  _fake_fashion(folder)
  _write(folder / (STEMS['train_images'] + '.gz'), _idx_bytes(np.zeros((12, 784), np.uint8)),
         True)
  with pytest.raises(DatasetError, match=r'must hold 3-D images'):
    data_lib.fashion_mnist(folder, download=False)


def test_fashion_mnist_truncated_file_named(tmp_path, no_system_data):
  folder = tmp_path / 'fm'
  _fake_fashion(folder)
  path = folder / (STEMS['test_images'] + '.gz')
  path.write_bytes(path.read_bytes()[:40])
  with pytest.raises(DatasetError, match=r't10k-images-idx3-ubyte.gz is a truncated gzip'):
    data_lib.fashion_mnist(folder, download=False)


def test_fashion_mnist_not_found_explains(tmp_path, no_system_data):
  with pytest.raises(DatasetError, match=r'(?s)Fashion-MNIST was not found. Looked for.*'
                     r'apt-get install dataset-fashion-mnist.*--data-dir'):
    data_lib.fashion_mnist(download=False)


def _refuse_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('no download may be tried')

  monkeypatch.setattr(data_lib.urllib.request, 'urlopen', refuse)


def test_data_dir_without_files_is_an_error_naming_it(tmp_path, monkeypatch):
  """A data_dir given is the only source: no fallback to $TRACT_OPTAX_DATA, no download."""
  _fake_fashion(tmp_path / 'env')
  monkeypatch.setenv(data_lib.DATA_ENV_VAR, str(tmp_path / 'env'))
  _refuse_network(monkeypatch)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DatasetError, match=r'(?s)Fashion-MNIST was not found in .*empty: it '
                     r'needs train-images-idx3-ubyte'):
    data_lib.fashion_mnist(tmp_path / 'empty')


@pytest.mark.parametrize('loader', [data_lib.fashion_mnist, data_lib.cifar10])
def test_data_dir_missing_or_a_file(tmp_path, loader, monkeypatch):
  _refuse_network(monkeypatch)
  with pytest.raises(DatasetError, match=r'The data folder .*nowhere does not exist'):
    loader(tmp_path / 'nowhere')
  (tmp_path / 'file').write_text('x')
  with pytest.raises(DatasetError, match=r'The data folder .*file is not a folder'):
    loader(tmp_path / 'file')


def test_fashion_mnist_download_failure_explains(tmp_path, no_system_data, monkeypatch):
  def refuse(*args, **kwargs):
    raise OSError('network unreachable (test)')

  monkeypatch.setattr(data_lib.urllib.request, 'urlopen', refuse)
  with pytest.raises(DatasetError, match=r'(?s)Downloading failed.*network unreachable.*'
                     r'apt-get install dataset-fashion-mnist'):
    data_lib.fashion_mnist(cache_dir=tmp_path / 'target')


def test_fashion_mnist_download_writes_checked_files(tmp_path, no_system_data, monkeypatch):
  source = tmp_path / 'mirror'
  arrays = _fake_fashion(source)
  requested = []

  class Response:
    def __init__(self, payload):
      self.payload = payload

    def read(self):
      return self.payload

    def __enter__(self):
      return self

    def __exit__(self, *args):
      return False

  def fake_urlopen(url, timeout):
    requested.append(url)
    return Response((source / url.rsplit('/', 1)[1]).read_bytes())

  monkeypatch.setattr(data_lib.urllib.request, 'urlopen', fake_urlopen)
  dataset = data_lib.fashion_mnist(cache_dir=tmp_path / 'cache')
  assert len(requested) == 4
  assert sorted(p.name for p in (tmp_path / 'cache').iterdir()) == sorted(
      s + '.gz' for s in STEMS.values())
  np.testing.assert_array_equal(dataset.test_labels, arrays['test_labels'])
  assert dataset.source.origin == 'download'
  assert dataset.source.folder == str((tmp_path / 'cache').resolve())


def test_fashion_mnist_download_rejects_bad_payload(tmp_path, no_system_data, monkeypatch):
  class Response:
    def read(self):
      return b'<html>not found</html>'

    def __enter__(self):
      return self

    def __exit__(self, *args):
      return False

  monkeypatch.setattr(data_lib.urllib.request, 'urlopen', lambda url, timeout: Response())
  with pytest.raises(DatasetError, match='not a gzip file'):
    data_lib.fashion_mnist(cache_dir=tmp_path / 'cache')
  assert not any((tmp_path / 'cache').iterdir())  # nothing half-written left behind


def test_lookup_order_data_dir_env_system(tmp_path, monkeypatch):
  explicit, env, system = tmp_path / 'explicit', tmp_path / 'env', tmp_path / 'system'
  _fake_fashion(explicit, train=3)
  _fake_fashion(env, train=4)
  _fake_fashion(system / 'fashion-mnist', train=5)  # a subfolder is found too
  monkeypatch.setenv(data_lib.DATA_ENV_VAR, str(env))
  monkeypatch.setattr(data_lib, 'SYSTEM_FASHION_MNIST_DIRS', (str(system),))
  dataset = data_lib.fashion_mnist(explicit, download=False)
  assert len(dataset.train_labels) == 3 and dataset.source.origin == 'data_dir'
  dataset = data_lib.fashion_mnist(download=False)
  assert len(dataset.train_labels) == 4 and dataset.source.origin == '$TRACT_OPTAX_DATA'
  monkeypatch.delenv(data_lib.DATA_ENV_VAR)
  dataset = data_lib.fashion_mnist(download=False)
  assert len(dataset.train_labels) == 5 and dataset.source.origin == 'system'
  assert dataset.source.folder == str((system / 'fashion-mnist').resolve())
  assert data_lib.find_fashion_mnist() == system / 'fashion-mnist'


def test_incomplete_folder_is_not_used(tmp_path, monkeypatch):
  partial, env = tmp_path / 'partial', tmp_path / 'env'
  _fake_fashion(partial)
  (partial / (STEMS['test_labels'] + '.gz')).unlink()
  _fake_fashion(env, train=7)
  monkeypatch.setenv(data_lib.DATA_ENV_VAR, str(env))
  assert data_lib.find_fashion_mnist(partial) is None  # never another source
  monkeypatch.setenv(data_lib.DATA_ENV_VAR, str(partial))
  monkeypatch.setattr(data_lib, 'SYSTEM_FASHION_MNIST_DIRS', (str(env),))
  assert data_lib.find_fashion_mnist() == env


def test_source_names_every_file_with_its_sha256(tmp_path, no_system_data):
  folder = tmp_path / 'fm'
  _fake_fashion(folder, compress=False)
  source = data_lib.fashion_mnist(folder).source
  assert source.origin == 'data_dir' and source.folder == str(folder.resolve())
  assert [f.name for f in source.files] == list(STEMS.values())
  for entry in source.files:
    content = (folder / entry.name).read_bytes()
    assert entry.sha256 == hashlib.sha256(content).hexdigest()
    assert entry.size_bytes == len(content)
  assert source.to_dict()['files'][0]['name'] == STEMS['train_images']
  text = source.describe()
  assert str(folder.resolve()) in text and source.files[2].sha256 in text


def test_raw_input_scale_keeps_pixel_values(tmp_path, no_system_data):
  arrays = _fake_fashion(tmp_path / 'fm')
  raw = data_lib.fashion_mnist(tmp_path / 'fm', input_scale='raw')
  assert raw.input_scale == 'raw' and raw.train_images.dtype == np.float32
  np.testing.assert_array_equal(raw.train_images[..., 0], arrays['train_images'])
  assert raw.mean.tolist() == [0.0] and raw.std.tolist() == [1.0]
  standardized = data_lib.fashion_mnist(tmp_path / 'fm')
  assert standardized.input_scale == 'standardized'
  np.testing.assert_allclose(raw.test_images, standardized.test_images * standardized.std
                             + standardized.mean, atol=1e-3)
  unit = data_lib.fashion_mnist(tmp_path / 'fm', input_scale='unit')
  np.testing.assert_allclose(unit.train_images * 255.0, raw.train_images, rtol=1e-6)
  assert unit.std.tolist() == [255.0]
  with pytest.raises(ValueError, match=r"input_scale must be one of \('standardized', 'raw', "
                     r"'unit'\)"):
    data_lib.fashion_mnist(tmp_path / 'fm', input_scale='percent')


# ------------------------------------------------------------------ digits


def test_digits_split_is_deterministic_and_stratified():
  first, second = data_lib.digits(), data_lib.digits()
  np.testing.assert_array_equal(first.test_labels, second.test_labels)
  np.testing.assert_array_equal(first.train_images, second.train_images)
  assert first.train_images.shape[1:] == (8, 8, 1)
  assert len(first.train_labels) + len(first.test_labels) == 1797
  assert set(np.unique(first.test_labels)) == set(range(10))
  assert abs(first.train_images.mean()) < 1e-5
  other = data_lib.digits(seed=1)
  assert not np.array_equal(other.test_labels, first.test_labels)


def test_digits_source_and_raw_scale():
  dataset = data_lib.load('digits', input_scale='raw')
  (entry,) = dataset.source.files
  assert dataset.source.origin == 'scikit-learn' and entry.name == 'digits.csv.gz'
  assert len(entry.sha256) == 64
  assert dataset.train_images.min() == 0 and dataset.train_images.max() == 16


def test_load_by_name_and_unknown(tmp_path):
  assert data_lib.load('digits').name == 'digits'
  with pytest.raises(ValueError, match='digits ships with scikit-learn and takes no data folder'):
    data_lib.load('digits', tmp_path)
  with pytest.raises(ValueError, match=r"Unknown dataset 'mnist'; choose one of"):
    data_lib.load('mnist')


def test_subset_is_deterministic():
  dataset = data_lib.digits()
  a, b = dataset.subset(100, 30, seed=3), dataset.subset(100, 30, seed=3)
  np.testing.assert_array_equal(a.train_labels, b.train_labels)
  assert a.train_images.shape == (100, 8, 8, 1) and len(a.test_labels) == 30
  assert dataset.subset(None, None) is not None
  with pytest.raises(ValueError, match='at least one example'):
    dataset.subset(-1)


# ---------------------------------------------------------------- CIFAR-10


def _cifar_batch(count, seed, *, labels_key=b'labels'):
  rng = np.random.default_rng(seed)
  return {b'batch_label': b'test', labels_key: rng.integers(0, 10, count).tolist(),
          b'data': rng.integers(0, 256, (count, 3072), dtype=np.uint8),
          b'filenames': [b'x.png'] * count}


def _fake_cifar(folder, count=4):
  folder.mkdir(parents=True, exist_ok=True)
  batches = {}
  for index, name in enumerate(data_lib.CIFAR10_TRAIN_FILES + (data_lib.CIFAR10_TEST_FILE,)):
    batches[name] = _cifar_batch(count, index)
    with open(folder / name, 'wb') as handle:
      pickle.dump(batches[name], handle, protocol=2)
  return batches


@pytest.mark.parametrize('nested', [False, True])
def test_cifar10_loads(tmp_path, monkeypatch, nested):
  monkeypatch.delenv(data_lib.DATA_ENV_VAR, raising=False)
  batches = _fake_cifar(tmp_path / data_lib.CIFAR10_FOLDER if nested else tmp_path)
  dataset = data_lib.cifar10(tmp_path)
  assert dataset.train_images.shape == (20, 32, 32, 3)
  assert dataset.test_images.shape == (4, 32, 32, 3)
  assert dataset.train_labels.dtype == np.int32
  np.testing.assert_allclose(dataset.train_images.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(dataset.train_images.std(axis=(0, 1, 2)), 1, atol=1e-4)
  # Channel-major rows become channels-last pixels.
  raw = batches['test_batch'][b'data'][0].reshape(3, 32, 32)
  restored = dataset.test_images[0] * dataset.std + dataset.mean
  np.testing.assert_allclose(restored[..., 1], raw[1], atol=1e-3)
  folder = tmp_path / data_lib.CIFAR10_FOLDER if nested else tmp_path
  assert dataset.source.folder == str(folder.resolve())
  assert [f.name for f in dataset.source.files] == list(batches)


def test_cifar10_data_dir_is_the_only_source(tmp_path, monkeypatch):
  _fake_cifar(tmp_path / 'env')
  monkeypatch.setenv(data_lib.DATA_ENV_VAR, str(tmp_path / 'env'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DatasetError, match=r'CIFAR-10 was not found: .* in .*empty or its'):
    data_lib.cifar10(tmp_path / 'empty')


def test_cifar10_from_env(tmp_path, monkeypatch):
  _fake_cifar(tmp_path / 'env' / data_lib.CIFAR10_FOLDER)
  monkeypatch.setenv(data_lib.DATA_ENV_VAR, str(tmp_path / 'env'))
  dataset = data_lib.cifar10()
  assert dataset.test_images.shape == (4, 32, 32, 3)
  assert dataset.source.origin == '$TRACT_OPTAX_DATA'
  raw = data_lib.cifar10(input_scale='raw')
  assert raw.train_images.max() > 200 and raw.input_scale == 'raw'


def test_cifar10_missing_explains(tmp_path, monkeypatch):
  monkeypatch.delenv(data_lib.DATA_ENV_VAR, raising=False)
  with pytest.raises(DatasetError, match=r'CIFAR-10 was not found.*cifar-10-python.tar.gz'):
    data_lib.cifar10(tmp_path)


def test_cifar10_truncated_pickle(tmp_path, monkeypatch):
  monkeypatch.delenv(data_lib.DATA_ENV_VAR, raising=False)
  _fake_cifar(tmp_path)
  path = tmp_path / 'data_batch_3'
  path.write_bytes(path.read_bytes()[:500])
  with pytest.raises(DatasetError, match=r'data_batch_3 is not a valid CIFAR-10 pickle batch'):
    data_lib.cifar10(tmp_path)


def test_cifar10_garbage_file(tmp_path, monkeypatch):
  monkeypatch.delenv(data_lib.DATA_ENV_VAR, raising=False)
  _fake_cifar(tmp_path)
  (tmp_path / 'test_batch').write_bytes(b'this is not a pickle at all')
  with pytest.raises(DatasetError, match=r'test_batch is not a valid CIFAR-10 pickle batch'):
    data_lib.cifar10(tmp_path)


def test_cifar10_refuses_arbitrary_objects(tmp_path, monkeypatch):
  monkeypatch.delenv(data_lib.DATA_ENV_VAR, raising=False)
  _fake_cifar(tmp_path)
  with open(tmp_path / 'data_batch_1', 'wb') as handle:
    pickle.dump({b'data': print}, handle)
  with pytest.raises(DatasetError, match=r'data_batch_1 .*refusing to load builtins.print'):
    data_lib.cifar10(tmp_path)


@pytest.mark.parametrize('batch, message', [
    ([1, 2, 3], 'must hold a dict'),
    ({b'data': np.zeros((2, 3072), np.uint8)}, "no 'data' and 'labels'"),
    ({b'data': np.zeros((2, 100), np.uint8), b'labels': [0, 1]}, r'shape \(count, 3072\)'),
    ({b'data': np.zeros((2, 3072), np.float32), b'labels': [0, 1]}, 'must be uint8'),
    ({b'data': np.zeros((2, 3072), np.uint8), b'labels': [0]}, 'holds 2 images but 1 labels'),
    ({b'data': np.zeros((2, 3072), np.uint8), b'labels': [0, 10]}, 'labels outside 0..9'),
])
def test_cifar10_bad_content(tmp_path, monkeypatch, batch, message):
  monkeypatch.delenv(data_lib.DATA_ENV_VAR, raising=False)
  _fake_cifar(tmp_path)
  with open(tmp_path / 'data_batch_2', 'wb') as handle:
    pickle.dump(batch, handle)
  with pytest.raises(DatasetError, match=r'data_batch_2.*' + message):
    data_lib.cifar10(tmp_path)


# ------------------------------------------------------ batches, augmentation


def test_batches_cover_everything_and_shuffle_deterministically():
  images, labels = np.arange(10)[:, None] * np.ones((1, 3)), np.arange(10)
  ordered = list(data_lib.batches(images, labels, 3))
  assert [len(y) for _, y in ordered] == [3, 3, 3, 1]
  np.testing.assert_array_equal(np.concatenate([y for _, y in ordered]), labels)
  first = [y for _, y in data_lib.batches(images, labels, 3, seed=(1, 0), drop_remainder=True)]
  again = [y for _, y in data_lib.batches(images, labels, 3, seed=(1, 0), drop_remainder=True)]
  other = [y for _, y in data_lib.batches(images, labels, 3, seed=(1, 1), drop_remainder=True)]
  assert [len(y) for y in first] == [3, 3, 3]
  np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
  assert not np.array_equal(np.concatenate(first), np.concatenate(other))
  for x, y in data_lib.batches(images, labels, 4, seed=0):
    np.testing.assert_array_equal(x[:, 0], y)  # images and labels stay paired


def test_batches_errors():
  with pytest.raises(ValueError, match='batch_size must be >= 1'):
    list(data_lib.batches(np.zeros(3), np.zeros(3), 0))
  with pytest.raises(ValueError, match='3 images but 2 labels'):
    list(data_lib.batches(np.zeros(3), np.zeros(2), 1))


def test_random_crop_flip_matches_reference():
  rng_images = np.random.default_rng(0)
  images = rng_images.normal(size=(16, 6, 5, 2)).astype(np.float32)
  out = data_lib.random_crop_flip(images, np.random.default_rng(7), pad=2, flip=True)
  # Replay the same random draws and crop one image at a time.
  rng = np.random.default_rng(7)
  top, left = rng.integers(0, 5, 16), rng.integers(0, 5, 16)
  mirrored = rng.random(16) < 0.5
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(16):
    crop = padded[i, top[i]:top[i] + 6, left[i]:left[i] + 5]
    expected = crop[:, ::-1] if mirrored[i] else crop
    np.testing.assert_array_equal(out[i], expected)
  assert out.dtype == images.dtype


def test_random_crop_flip_identity_and_flip_only():
  images = np.random.default_rng(0).normal(size=(8, 4, 4, 1))
  same = data_lib.random_crop_flip(images, np.random.default_rng(0), pad=0, flip=False)
  np.testing.assert_array_equal(same, images)
  flipped = data_lib.random_crop_flip(images, np.random.default_rng(0), pad=0, flip=True)
  for original, result in zip(images, flipped):
    assert np.array_equal(result, original) or np.array_equal(result, original[:, ::-1])
