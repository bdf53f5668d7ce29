"""Stand-ins for collectives that a test platform lacks (XLA:CPU has no ragged_all_to_all)."""

import jax
import jax.numpy as jnp


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all` built from all_gather, for backends without it (XLA:CPU).

  Same contract (one slice per peer): peer i's slice for me, operand_i[input_offsets_i[me] :
  + send_sizes_i[me]], is written to output[output_offsets_i[me] :]. Gathers every operand, so
  it is a test double, not a transport.
  """
  del recv_sizes  # implied by the senders' sizes
  me = jax.lax.axis_index(axis_name)
  operands = jax.lax.all_gather(operand, axis_name)
  offsets = jax.lax.all_gather(input_offsets, axis_name)
  sizes = jax.lax.all_gather(send_sizes, axis_name)
  targets = jax.lax.all_gather(output_offsets, axis_name)
  rows = jnp.arange(operand.shape[0])
  for source in range(operands.shape[0]):
    start, size, target = offsets[source, me], sizes[source, me], targets[source, me]
    values = operands[source][jnp.clip(start + rows, 0, operand.shape[0] - 1)]
    where = jnp.where(rows < size, target + rows, output.shape[0])
    output = output.at[where].set(values, mode="drop")
  return output
