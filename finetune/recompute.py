"""--recompute: gradients that keep only each transformer block's input from the forward pass.

What gpt-2-simple's memory_saving_gradients did on TensorFlow 1 (it refuses TensorFlow 2), for the
graph finetune.blocks builds: the backward pass walks the blocks from the last to the first, builds
each block once more from its kept input and differentiates that copy. The copy waits for the
gradient that flows into it, so it runs in the backward pass, one block at a time, and the forward
pass's activations inside a block are freed as soon as the next block has its input. Costs one
more forward pass of the blocks (~1.3x the time of a step); the gradients are the same.
"""
import tensorflow as tf

from finetune.blocks import rebuild_block


def gradients(loss, var_list, output, hparams):
    """Like tf.gradients(loss, var_list); output is finetune.blocks.model's result."""
    wanted = {v.ref() for v in var_list}
    grads = {}

    def add(pairs):
        for v, g in pairs:
            if g is not None:
                g = tf.convert_to_tensor(g)  # an embedding's IndexedSlices
                grads[v.ref()] = grads[v.ref()] + g if v.ref() in grads else g

    def block_vars(layer):
        return [v for v in var_list if v.name.startswith(f"model/h{layer}/")]

    in_blocks = {v.ref() for layer in range(hparams.n_layer) for v in block_vars(layer)}
    outside = [v for v in var_list if v.ref() not in in_blocks]  # ln_f, wte, wpe

    # The head (ln_f, the logits): the gradient into the last block's output, and wte's from the logits.
    last = output["block_output"]
    head = tf.gradients(ys=loss, xs=[last] + outside, stop_gradients=[last])
    add(zip(outside, head[1:]))
    d_h = head[0]
    for layer in reversed(range(hparams.n_layer)):
        x = output["block_inputs"][layer]
        with tf.control_dependencies([d_h]):  # recompute only once the backward pass gets here
            x = tf.identity(x)
        y = rebuild_block(x, layer, hparams)
        xs = block_vars(layer)
        g = tf.gradients(ys=y, xs=[x] + xs, grad_ys=d_h)
        add(zip(xs, g[1:]))
        d_h = g[0]
    # The embeddings: h0 = wte[X] + wpe[positions].
    embeddings = [v for v in outside if v.name.split(":")[0] in ("model/wte", "model/wpe")]
    if embeddings:
        add(zip(embeddings, tf.gradients(ys=output["block_inputs"][0], xs=embeddings, grad_ys=d_h)))
    missing = [v.name for v in var_list if v.ref() not in grads]
    if missing or len(wanted) != len(grads):
        raise ValueError(f"no recomputed gradient for {missing}")
    return [grads[v.ref()] for v in var_list]
