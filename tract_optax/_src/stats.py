"""The TrAct input statistic of a first layer: its type and how to combine it.

TrAct needs, for each preconditioned layer, the second moment of the layer's
input rows ``A`` (``N`` rows of ``n`` features): ``A^T A / N``. When a batch holds
fewer rows than features (``N < n``) the ``n x n`` moment is singular and larger
than the rows themselves, so the rows are kept instead and the transformation
uses the Woodbury identity (an ``N x N`` system).

This module defines the statistic type, ``TractStats``, and the operations
every producer of statistics shares: building one from a row matrix, combining
the statistics of several calls, and averaging across devices.

The form is chosen from static shapes (``woodbury_form``). Under
``jax.export`` with a symbolic batch size the row count ``N`` is a symbolic
expression (``b``, ``64*b``): where ``N < n`` is settled for every batch size
(``64*b < 27`` is false, as ``b >= 1``), that decides; where it is not, the
moment form is taken when ``n <= SYMBOLIC_MOMENT_MAX_FEATURES`` (4096: a 64 MiB
float32 moment), the rows otherwise. ``form='moment'`` / ``form='rows'`` pick
the form outright. Both forms give the same TrAct update (up to rounding).
"""

from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from tract_optax._src import jax_compat
from tract_optax._src.axes import AxisName

PrecisionLike = Union[None, str, jax.lax.Precision]

#: Matmul precision used for statistics unless the caller picks another one.
#: ``None`` follows JAX's own matmul precision (``jax.default_matmul_precision``
#: or the ``jax_default_matmul_precision`` flag), the precision at which the
#: model's kernel gradient ``G`` is computed too: full float32 on CPUs, TF32
#: on recent GPUs, bfloat16 passes on TPUs. Pass ``'highest'`` for an exact
#: float32 statistic there (TF32 moved the TrAct gradient by about 1.6e-4
#: relative on an H200). The solve always runs at full precision.
DEFAULT_PRECISION: Optional[jax.lax.Precision] = None

#: The two forms of a statistic: the ``n x n`` moment, or the rows themselves
#: (Woodbury form). ``form=None`` picks one by ``woodbury_form``'s rule.
FORMS = ('moment', 'rows')

#: With a symbolic row count (``jax.export`` with a symbolic batch size) whose
#: comparison with ``n`` is not settled by the shapes, a statistic of at most
#: this many features keeps the moment (at most 64 MiB in float32, the same as
#: ``conv_stats``' default chunk budget); a wider one keeps
#: the rows, whose Woodbury system is ``N x N``.
SYMBOLIC_MOMENT_MAX_FEATURES = 4096

# Raised for a comparison that symbolic shapes leave open.
_INCONCLUSIVE = jax_compat.INCONCLUSIVE_DIMENSION


class TractStats(NamedTuple):
  """Input statistic of one layer, as TrAct consumes it.

  Exactly one of ``moment`` and ``rows`` is set; the form is decided from static
  shapes when the statistic is computed (``woodbury_form``: with a
  symbolic batch size, from ``n`` alone where the shapes leave ``N < n``
  open), or chosen with the producers' ``form`` argument.

  Attributes:
    moment: ``(n, n)`` second moment ``A^T A / N`` of the input rows, or
      ``(groups, n, n)`` for a grouped convolution; float32 or wider.
    rows: ``(N, n)`` input rows themselves (``(groups, N, n)`` when grouped),
      kept instead of the moment when ``N < n`` (Woodbury form).
    count: number of rows ``N`` as a float scalar array.

  Example:
    >>> import jax.numpy as jnp
    >>> s = tract_optax.dense_stats(jnp.ones((8, 3)))
    >>> s.moment.shape, float(s.count)
    ((3, 3), 8.0)
  """

  moment: Optional[jax.Array]
  rows: Optional[jax.Array]
  # The field shadows tuple.count (a method); it is part of the public API.
  count: jax.Array  # type: ignore[assignment]

  def _array(self) -> jax.Array:
    """The moment, or else the rows."""
    data = self.moment if self.moment is not None else self.rows
    if data is None:
      raise TypeError(
        'This TractStats holds neither a moment nor rows. Build it with '
        'dense_stats, conv_stats or stats_from_rows.'
      )
    return data

  @property
  def num_features(self) -> int:
    """``n``, the number of input features per row (per group)."""
    return self._array().shape[-1]

  @property
  def groups(self) -> int:
    """Number of feature groups (1 for Dense and ungrouped conv layers)."""
    data = self._array()
    return data.shape[0] if data.ndim == 3 else 1

  @property
  def is_woodbury(self) -> bool:
    """Whether the statistic keeps the rows (``N < n``) instead of the moment."""
    return self.rows is not None

  def validate(self, where: str = 'tract_optax') -> TractStats:
    """Returns ``self`` after checking that it is a well-formed statistic.

    Args:
      where: who asks, for the message.

    Raises:
      TypeError: if not exactly one of ``moment`` and ``rows`` is set, or the
        count is missing.
      ValueError: if the shapes do not form a statistic.
    """
    if (self.moment is None) == (self.rows is None):
      raise TypeError(
        f'{where}: a TractStats holds exactly one of moment (A^T A / N) and '
        f'rows (Woodbury form); got moment={_shape_text(self.moment)}, '
        f'rows={_shape_text(self.rows)}. Build it with dense_stats, '
        'conv_stats or stats_from_rows.'
      )
    if self.count is None:
      raise TypeError(f'{where}: TractStats.count (the row count N) is missing.')
    if jnp.ndim(self.count) != 0:
      raise ValueError(
        f'{where}: TractStats.count has shape {jnp.shape(self.count)}: this is '
        'a stack of statistics (from jax.vmap or lax.scan over micro-batches), '
        'not one, and its leading axis would be read as feature groups. '
        'Combine them first: tract_optax.combine_stats([...]) or the capture '
        'outside the vmap/scan.'
      )
    if self.moment is not None:
      shape = jnp.shape(self.moment)
      if len(shape) not in (2, 3) or shape[-1] != shape[-2] or shape[-1] == 0:
        raise ValueError(
          f'{where}: TractStats.moment must be (n, n) or (groups, n, n) with '
          f'n >= 1; got shape {shape}.'
        )
    elif self.rows is not None:
      shape = jnp.shape(self.rows)
      if len(shape) not in (2, 3) or shape[-1] == 0:
        raise ValueError(
          f'{where}: TractStats.rows must be (N, n) or (groups, N, n) with '
          f'n >= 1; got shape {shape}.'
        )
    return self


def _shape_text(value: Optional[ArrayLike]) -> str:
  return 'None' if value is None else f'array of shape {jnp.shape(value)}'


def settled(comparison: Callable[[], object]) -> Optional[bool]:
  """The truth of a comparison of shapes, or None where symbolic shapes leave it open.

  Args:
    comparison: a function of no arguments that compares dimension sizes,
      e.g. ``lambda: num_rows < num_features``.

  Returns:
    ``True`` or ``False`` when the shapes settle it (always, for concrete
    shapes), ``None`` when it depends on the value of a symbolic dimension
    (``jax.export`` with a symbolic batch size).

  Example:
    >>> settled(lambda: 3 < 4)
    True
  """
  try:
    return bool(comparison())
  except _INCONCLUSIVE:
    return None


def check_form(form: Optional[str], where: str) -> Optional[str]:
  """``form`` if it is None or one of ``FORMS``; a ValueError naming it otherwise."""
  if form is None or (isinstance(form, str) and form in FORMS):
    return form
  raise ValueError(
    f"{where}: form={form!r} is not understood; use 'moment' (the n x n "
    "moment A^T A / N), 'rows' (the rows, Woodbury form) or None (chosen "
    'from the shapes).'
  )


def woodbury_form(num_rows: int, num_features: int, form: Optional[str] = None) -> bool:
  """Whether a statistic of ``num_rows`` rows of ``num_features`` keeps the rows.

  The rule every statistic follows:

  * ``form='rows'`` or ``form='moment'``: that form, whatever the shapes.
  * ``form=None``: the rows (Woodbury form) when ``N < n``, the moment
    otherwise. Where ``N`` is symbolic (``jax.export`` with a symbolic batch
    size) and the shapes do not settle ``N < n`` for every batch size, the
    moment when ``n <= SYMBOLIC_MOMENT_MAX_FEATURES`` (4096), the rows
    otherwise: one program serves every batch size, so the form cannot follow
    the batch.

  Args:
    num_rows: ``N``, an int or a symbolic dimension.
    num_features: ``n``.
    form: None, 'moment' or 'rows'.

  Returns:
    True for the rows (Woodbury form), False for the moment.

  Raises:
    ValueError: if ``form`` is not None, 'moment' or 'rows'.

  Example:
    >>> woodbury_form(8, 27), woodbury_form(64, 27), woodbury_form(64, 27, 'rows')
    (True, False, True)
  """
  form = check_form(form, 'woodbury_form')
  if form is not None:
    return form == 'rows'
  fewer_rows = settled(lambda: num_rows < num_features)
  if fewer_rows is None:
    return num_features > SYMBOLIC_MOMENT_MAX_FEATURES
  return fewer_rows


def as_real_input(x: ArrayLike, where: str) -> jax.Array:
  """``x`` as an array fit for a statistic: floats kept, integers as float32.

  Integer and bool inputs (e.g. uint8 images, or numpy's default int64 with
  ``jax_enable_x64``) become float32; complex inputs are rejected, since
  TrAct's statistic ``A^T A`` is defined for real inputs.

  Args:
    x: layer inputs.
    where: the calling function, for the message.

  Returns:
    ``x`` as a real floating-point array.

  Raises:
    TypeError: if ``x`` is complex or not numeric.

  Example:
    >>> as_real_input(jnp.arange(3, dtype=jnp.uint8), 'dense_stats').dtype
    dtype('float32')
  """
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError(
      f'{where}: TrAct statistics are defined for real inputs; got '
      f'{x.dtype}. Feed the real and imaginary parts as separate features '
      'if the layer is real-valued.'
    )
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x
  if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
    return x.astype(jnp.float32)
  raise TypeError(f'{where}: inputs must be real numbers; got dtype {x.dtype}.')


def safe_divide(total: jax.Array, count: jax.Array) -> jax.Array:
  """``total / count``, and zeros where ``count`` is 0 (no rows: no moment)."""
  count = jnp.asarray(count, total.dtype)
  return total / jnp.where(count > 0, count, jnp.ones_like(count))


def mean_eigenvalue(stats: TractStats) -> jax.Array:
  """``trace(A^T A / N) / n`` per feature group: the scale of the inputs.

  The relative ridge of ``tract`` (``relative_lam=True``) is
  ``lam`` times this value. It is 0 for a statistic of no rows.

  Args:
    stats: a statistic in either form.

  Returns:
    ``(groups,)`` array (``(1,)`` for an ungrouped statistic).

  Example:
    >>> s = tract_optax.dense_stats(3.0 * jnp.ones((4, 2)))
    >>> mean_eigenvalue(s).tolist()
    [9.0]
  """
  n = stats.num_features
  if stats.moment is not None:
    moment = stats.moment.reshape((-1, n, n))
    return jnp.trace(moment, axis1=-2, axis2=-1) / n
  rows = stats._array().reshape((stats.groups, -1, n))  # the rows: no moment
  squares = jnp.sum(jnp.square(rows), axis=(-2, -1))
  return safe_divide(squares, stats.count) / n


def stats_dtype(input_dtype: jnp.dtype) -> jnp.dtype:
  """Float dtype of statistics computed from inputs of ``input_dtype``.

  Half-precision inputs give float32; float64 inputs (with ``jax_enable_x64``)
  give float64.

  Example:
    >>> stats_dtype(jnp.bfloat16)
    dtype('float32')
  """
  return jnp.promote_types(jnp.dtype(input_dtype), jnp.float32)


def _normalize_precision(precision: PrecisionLike) -> Optional[jax.lax.Precision]:
  if precision is None or isinstance(precision, jax.lax.Precision):
    return precision
  names = {
    'default': jax.lax.Precision.DEFAULT,
    'high': jax.lax.Precision.HIGH,
    'highest': jax.lax.Precision.HIGHEST,
  }
  try:
    return names[str(precision).lower()]
  except KeyError:
    raise ValueError(
      f"precision={precision!r} is not understood; use 'default', 'high', "
      "'highest' or a jax.lax.Precision."
    ) from None


def gram(rows: jax.Array, precision: PrecisionLike = DEFAULT_PRECISION) -> jax.Array:
  """``rows^T rows`` with float32 (or wider) accumulation, input not upcast.

  Args:
    rows: ``(..., N, n)`` matrix; leading axes are batch axes of the result.
    precision: matmul precision ('default', 'high', 'highest').

  Returns:
    ``(..., n, n)`` un-normalised Gram matrix in ``stats_dtype``.
  """
  out_dtype = stats_dtype(rows.dtype)
  batch = tuple(range(rows.ndim - 2))
  contract = rows.ndim - 2
  return jax.lax.dot_general(
    rows,
    rows,
    (((contract,), (contract,)), (batch, batch)),
    precision=_normalize_precision(precision),
    preferred_element_type=out_dtype,
  )


def stats_from_rows(
  rows: jax.Array,
  *,
  precision: PrecisionLike = DEFAULT_PRECISION,
  force_moment: bool = False,
  form: Optional[str] = None,
) -> TractStats:
  """Statistic of an explicit ``(N, n)`` row matrix (``(groups, N, n)`` grouped).

  Keeps the rows (Woodbury form) when ``N < n``, the moment otherwise. With a
  symbolic ``N`` (``jax.export`` with a symbolic batch size) that the shapes
  do not settle against ``n``: the moment when ``n <= 4096``, the rows
  otherwise (``SYMBOLIC_MOMENT_MAX_FEATURES``); ``form`` overrides it.

  Args:
    rows: input rows, one per position at which the layer's kernel is applied.
    precision: matmul precision of the moment.
    force_moment: keep the moment even when ``N < n`` (the same as
      ``form='moment'``).
    form: 'moment' or 'rows' to choose the form outright; None (the
      default) chooses it from the shapes as above.

  Returns:
    The ``TractStats`` of ``rows``.

  Raises:
    ValueError: if ``rows`` is not 2-D (or 3-D, grouped) or has no features,
      or ``form`` is not understood or contradicts ``force_moment``.
    TypeError: for complex rows.

  Example:
    >>> import jax.numpy as jnp
    >>> stats_from_rows(jnp.ones((2, 5))).is_woodbury
    True
    >>> stats_from_rows(jnp.ones((2, 5)), form='moment').moment.shape
    (5, 5)
  """
  form = check_form(form, 'stats_from_rows')
  if force_moment:
    if form == 'rows':
      raise ValueError(
        "stats_from_rows: force_moment=True contradicts form='rows'; pass one of them."
      )
    form = 'moment'
  rows = as_real_input(rows, 'stats_from_rows')
  if rows.ndim not in (2, 3) or rows.shape[-1] == 0:
    raise ValueError(
      'stats_from_rows needs rows of shape (N, n), or (groups, N, n), with '
      f'n >= 1 features; got shape {rows.shape}. For a single input row use '
      'rows[None]; for inputs with several leading axes use dense_stats.'
    )
  num_rows, num_features = rows.shape[-2], rows.shape[-1]
  dtype = stats_dtype(rows.dtype)
  count = jnp.asarray(num_rows, dtype)
  if woodbury_form(num_rows, num_features, form):
    return TractStats(moment=None, rows=rows.astype(dtype), count=count)
  return TractStats(moment=safe_divide(gram(rows, precision), count), rows=None, count=count)


def moment_array(stats: TractStats, precision: PrecisionLike = DEFAULT_PRECISION) -> jax.Array:
  """The moment ``A^T A / N`` of a statistic in either form (from the rows if it keeps them)."""
  if stats.rows is not None and stats.moment is None:
    return safe_divide(gram(stats.rows, precision), stats.count)
  return stats._array()


def to_moment(stats: TractStats, precision: PrecisionLike = DEFAULT_PRECISION) -> TractStats:
  """Converts a statistic to the moment form (a no-op if it is in that form)."""
  if stats.moment is not None:
    return stats
  return TractStats(moment=moment_array(stats, precision), rows=None, count=stats.count)


def combine_stats(
  stats: Sequence[TractStats], *, precision: PrecisionLike = DEFAULT_PRECISION
) -> TractStats:
  """Statistic of the union of the rows behind several statistics.

  Used when a layer is called more than once in a forward pass: the result is
  exactly the statistic of all rows of all calls.

  Args:
    stats: statistics of the same layer (same ``n`` and groups).
    precision: matmul precision where rows become a moment.

  Returns:
    The combined ``TractStats``; rows are concatenated while the total
    stays below ``n`` (by ``woodbury_form``'s rule where the row counts
    are symbolic), otherwise moments are averaged weighted by row count.
    A statistic of zero rows contributes nothing.

  Raises:
    ValueError: if ``stats`` is empty or the feature counts differ.

  Example:
    >>> import jax.numpy as jnp
    >>> a, b = jnp.ones((4, 2)), jnp.zeros((4, 2))
    >>> s = combine_stats([tract_optax.dense_stats(a), tract_optax.dense_stats(b)])
    >>> s.moment.tolist(), float(s.count)
    ([[0.5, 0.5], [0.5, 0.5]], 8.0)
  """
  stats = [TractStats(*s).validate('combine_stats') for s in stats]
  if not stats:
    raise ValueError('combine_stats needs at least one statistic.')
  if len(stats) == 1:
    return stats[0]
  shapes = {(s.groups, s.num_features) for s in stats}
  if len(shapes) > 1:
    raise ValueError(
      f'Cannot combine statistics of different layers: (groups, n) differ: {sorted(shapes)}.'
    )
  total = sum((s.count for s in stats[1:]), stats[0].count)
  if all(s.is_woodbury for s in stats):
    rows = jnp.concatenate([s.rows for s in stats if s.rows is not None], axis=-2)
    if woodbury_form(rows.shape[-2], rows.shape[-1]):
      return TractStats(moment=None, rows=rows, count=total)
    return stats_from_rows(rows, precision=precision)
  weighted = [moment_array(s, precision) * s.count for s in stats]
  return TractStats(
    moment=safe_divide(sum(weighted[1:], weighted[0]), total), rows=None, count=total
  )


def _axis_size(axis_name: AxisName) -> int:
  """Number of members of the mapped axis (or axes) ``axis_name``."""
  if hasattr(jax.lax, 'axis_size'):
    return jax.lax.axis_size(axis_name)
  return jax.lax.psum(1, axis_name)  # a Python int for a Python int operand


def _gather_rows(rows: jax.Array, axis_name: AxisName) -> jax.Array:
  """Every device's rows, concatenated along the row axis, on every device.

  A ``psum`` of zero-padded blocks rather than ``all_gather``: under
  ``shard_map`` with replication checking (``check_vma``, on by default) the
  output of ``all_gather`` counts as device-varying, so a result built from it
  cannot be returned as replicated (``out_specs=P()``); a ``psum`` is
  device-invariant. Only zeros are added, so the sum is exact.
  """
  size = _axis_size(axis_name)
  local = rows.shape[-2]
  row_axis = rows.ndim - 2
  padded = jnp.zeros(rows.shape[:-2] + (size * local, rows.shape[-1]), rows.dtype)
  start: List[Any] = [0] * rows.ndim
  start[row_axis] = jax.lax.axis_index(axis_name) * local
  padded = jax.lax.dynamic_update_slice(padded, rows, start)
  return jax.lax.psum(padded, axis_name)


def all_reduce_stats(
  stats: TractStats, axis_name: AxisName, *, precision: PrecisionLike = DEFAULT_PRECISION
) -> TractStats:
  """Global-batch statistic from per-device statistics over ``axis_name``.

  Inside ``pmap`` or ``shard_map`` each device sees only its part of the batch;
  this returns the statistic of the whole batch on every device: the
  row-count-weighted mean of the moments (rows are gathered in Woodbury form).

  Args:
    stats: this device's statistic.
    axis_name: the mapped axis (or tuple of axes) that splits the batch.
    precision: matmul precision where rows become a moment.

  Returns:
    The global-batch ``TractStats``. Its form follows the global row
    count: the rows of all devices are gathered only while they number fewer
    than ``n`` (a small system); otherwise each device turns its rows into a
    moment first, so no device ever factors a (devices x local rows)^2 system.
  """
  total = jax.lax.psum(stats.count, axis_name)
  if stats.rows is not None:
    global_rows = _axis_size(axis_name) * stats.rows.shape[-2]
    if woodbury_form(global_rows, stats.num_features):
      return TractStats(moment=None, rows=_gather_rows(stats.rows, axis_name), count=total)
  weighted = moment_array(stats, precision) * stats.count
  moment = safe_divide(jax.lax.psum(weighted, axis_name), total)
  return TractStats(moment=moment, rows=None, count=total)


def dense_stats(
  x: jax.Array, *, precision: PrecisionLike = DEFAULT_PRECISION, form: Optional[str] = None
) -> TractStats:
  """Statistic of the inputs of a Dense layer.

  Every row of ``x`` is one input: all leading axes are flattened, so a ViT's
  ``(batch, tokens, features)`` gives ``N = batch * tokens`` rows. The moment is
  one matmul with float32 (or wider) accumulation; half-precision inputs are
  not upcast first.

  The form follows the shapes: the rows (Woodbury form) when ``N < n``, the
  moment otherwise. Under ``jax.export`` with a symbolic batch size, where the
  shapes cannot tell ``N < n`` for every batch size, one form must serve them
  all: the moment when ``n <= 4096``, the rows for wider inputs (e.g. a Dense
  stem on raw pixels). Pass ``form`` to choose outright.

  Args:
    x: ``(..., n)`` layer inputs, at least 1-D.
    precision: matmul precision ('default', 'high', 'highest').
    form: 'moment', 'rows' (Woodbury form), or None (the default) to choose
      from the shapes as above.

  Returns:
    The ``TractStats`` of the ``N x n`` input rows.

  Raises:
    ValueError: if ``x`` is a scalar or has no features, or ``form`` is not
      understood.
    TypeError: for complex inputs (integer inputs are read as float32).

  Example:
    >>> import jax.numpy as jnp
    >>> s = tract_optax.dense_stats(jnp.ones((4, 16, 8)))  # batch x tokens x n
    >>> s.moment.shape, float(s.count)
    ((8, 8), 64.0)
    >>> b, = jax.export.symbolic_shape('b')  # any batch size, one program
    >>> exported = jax.export.export(jax.jit(tract_optax.dense_stats))(
    ...     jax.ShapeDtypeStruct((b, 8), jnp.float32))
    >>> exported.call(jnp.ones((3, 8))).moment.shape  # 3 < 8, still the moment
    (8, 8)
  """
  form = check_form(form, 'dense_stats')
  x = as_real_input(x, 'dense_stats')
  if x.ndim < 1 or x.shape[-1] == 0:
    raise ValueError(
      f'dense_stats needs inputs of shape (..., n) with n >= 1 features; got shape {x.shape}.'
    )
  with jax.named_scope('tract_dense_stats'):
    return stats_from_rows(x.reshape(-1, x.shape[-1]), precision=precision, form=form)
