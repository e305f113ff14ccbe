"""gpt-2-simple's GPT-2 graph, built block by block from its own ops (gpt_2_simple.src.model).

The variables, their names and their initialisers are gpt-2-simple's, so checkpoints are the same.
Two things differ from model.model: the output also lists each transformer block's input (what
finetune.recompute keeps), and the attention mask subtracts 1e4 instead of 1e10, which is above
float16's range (65504): under the float16 rewrite 1e10 becomes inf, and inf * 0 is NaN. Either
value is exp() = 0 after the softmax in every precision, so the loss is the same.
"""
import contextlib

import tensorflow as tf
from gpt_2_simple.src import model as gpt2

MASK = 1e4


def attn(x, scope, n_state, *, past, hparams):
    """gpt2.attn with the float16-safe mask."""
    def split_heads(x):
        return tf.transpose(a=gpt2.split_states(x, hparams.n_head), perm=[0, 2, 1, 3])

    def merge_heads(x):
        return gpt2.merge_states(tf.transpose(a=x, perm=[0, 2, 1, 3]))

    def multihead_attn(q, k, v):
        w = tf.matmul(q, k, transpose_b=True)
        w = w * tf.math.rsqrt(tf.cast(int(v.shape[-1]), w.dtype))
        _, _, nd, ns = gpt2.shape_list(w)
        b = tf.reshape(gpt2.attention_mask(nd, ns, dtype=w.dtype), [1, 1, nd, ns])
        w = w * b - tf.cast(MASK, w.dtype) * (1 - b)
        return tf.matmul(gpt2.softmax(w), v)

    with tf.compat.v1.variable_scope(scope):
        c = gpt2.conv1d(x, "c_attn", n_state * 3)
        q, k, v = map(split_heads, tf.split(c, 3, axis=2))
        present = tf.stack([k, v], axis=1)
        if past is not None:
            pk, pv = tf.unstack(past, axis=1)
            k = tf.concat([pk, k], axis=-2)
            v = tf.concat([pv, v], axis=-2)
        a = merge_heads(multihead_attn(q, k, v))
        return gpt2.conv1d(a, "c_proj", n_state), present


def block(x, scope, *, past, hparams):
    """gpt2.block with attn above."""
    with tf.compat.v1.variable_scope(scope):
        nx = int(x.shape[-1])
        a, present = attn(gpt2.norm(x, "ln_1"), "attn", nx, past=past, hparams=hparams)
        x = x + a
        return x + gpt2.mlp(gpt2.norm(x, "ln_2"), "mlp", nx * 4, hparams=hparams), present


def model(hparams, X, past=None, scope="model", reuse=False):
    """gpt2.model's results (logits, present) plus 'block_inputs' (h before each block) and
    'block_output' (h after the last one)."""
    with tf.compat.v1.variable_scope(scope, reuse=reuse):
        batch, sequence = gpt2.shape_list(X)
        wpe = tf.compat.v1.get_variable("wpe", [hparams.n_ctx, hparams.n_embd],
                                        initializer=tf.compat.v1.random_normal_initializer(stddev=0.01))
        wte = tf.compat.v1.get_variable("wte", [hparams.n_vocab, hparams.n_embd],
                                        initializer=tf.compat.v1.random_normal_initializer(stddev=0.02))
        past_length = 0 if past is None else tf.shape(input=past)[-2]
        h = tf.gather(wte, X) + tf.gather(wpe, gpt2.positions_for(X, past_length))
        pasts = tf.unstack(past, axis=1) if past is not None else [None] * hparams.n_layer
        inputs, presents = [], []
        for layer, layer_past in enumerate(pasts):
            inputs.append(h)
            h, present = block(h, f"h{layer}", past=layer_past, hparams=hparams)
            presents.append(present)
        output = h
        h = gpt2.norm(h, "ln_f")
        logits = tf.matmul(tf.reshape(h, [batch * sequence, hparams.n_embd]), wte, transpose_b=True)
        return {"logits": tf.reshape(logits, [batch, sequence, hparams.n_vocab]),
                "present": tf.stack(presents, axis=1), "block_inputs": inputs, "block_output": output}


def rebuild_block(x, layer, hparams, scope="model"):
    """Block `layer` again on input x, with the same (reused) variables; its output."""
    with tf.compat.v1.variable_scope(scope, reuse=True):
        return block(x, f"h{layer}", past=None, hparams=hparams)[0]


@contextlib.contextmanager
def in_sampler(active=True):
    """gpt-2-simple's sampler builds gpt2.model; while active, it builds this module's model."""
    saved = gpt2.model
    if active:
        gpt2.model = model
    try:
        yield
    finally:
        gpt2.model = saved
