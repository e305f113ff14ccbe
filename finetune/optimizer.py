"""The training step's optimizer: --optimizer, --train-layers, --recompute and float16's loss scale.

Loss scaling (--precision fp16): the loss is multiplied by a scale before the backward pass and
the gradients divided by it after, so that small gradients do not flush to zero in float16; a step
whose gradients overflow is skipped (weights and moments as they were) and the scale halved, and
after GROW_EVERY good steps in a row it is doubled.

gpt-2-simple's AccumulatingOptimizer calls compute_gradients(loss, var_list) and
apply_gradients(pairs) on the optimizer it wraps; Optimizer below answers both, so the same three
options and the loss scale cover --accumulate-gradients 1 (which calls them directly) too.
"""
import tensorflow as tf

INITIAL_SCALE = 2.0 ** 15
GROW_EVERY = 2000  # good steps before the scale doubles (what Keras and apex use)


def trained_variables(all_vars, train_layers):
    """gpt-2-simple's only_train_transformer_layers: the blocks' variables (model/hN/...); the
    embeddings and the final norm stay as they are and get no optimizer state."""
    if train_layers == "transformer":
        return [v for v in all_vars if "/h" in v.name]
    return all_vars


class Optimizer:
    def __init__(self, name, learning_rate, gradients=None, loss_scale=None):
        """gradients(loss, var_list) -> list (default tf.gradients); loss_scale a precision.LossScale."""
        if name == "sgd":
            self.opt = tf.compat.v1.train.GradientDescentOptimizer(learning_rate=learning_rate)
        else:
            self.opt = tf.compat.v1.train.AdamOptimizer(learning_rate=learning_rate)
        self.gradients = gradients or (lambda loss, var_list: tf.gradients(ys=loss, xs=var_list))
        self.loss_scale = loss_scale

    def compute_gradients(self, loss, var_list):
        if self.loss_scale is None:
            return list(zip(self.gradients(loss, var_list), var_list))
        grads = self.gradients(self.loss_scale.scale_loss(loss), var_list)
        return list(zip(self.loss_scale.unscale(grads), var_list))

    def apply_gradients(self, grads_and_vars):
        if self.loss_scale is None:
            return self.opt.apply_gradients(grads_and_vars)
        return self.loss_scale.apply(lambda: self.opt.apply_gradients(grads_and_vars),
                                     [g for g, _ in grads_and_vars])


class LossScale:
    """Dynamic loss scaling around an optimizer's gradients (float16's), state outside model/."""

    def __init__(self):
        with tf.compat.v1.variable_scope("loss_scale"):  # not "model/": never in a checkpoint
            self.scale = tf.compat.v1.get_variable("scale", initializer=INITIAL_SCALE, trainable=False)
            self.good_steps = tf.compat.v1.get_variable("good_steps", initializer=0, trainable=False)
            self.skipped = tf.compat.v1.get_variable("skipped", initializer=False, trainable=False)

    def scale_loss(self, loss):
        return loss * tf.cast(self.scale, loss.dtype)

    def unscale(self, grads):
        return [None if g is None else g / self.scale for g in grads]

    def apply(self, apply_gradients, grads):
        """apply_gradients() only when every gradient is finite; else skip it and halve the scale."""
        finite = tf.reduce_all(input_tensor=[tf.reduce_all(input_tensor=tf.math.is_finite(g))
                                             for g in grads if g is not None])

        def apply():
            with tf.control_dependencies([apply_gradients()]):
                grow = tf.equal(self.good_steps + 1, GROW_EVERY)
                return tf.group(
                    self.scale.assign(tf.where(grow, self.scale * 2, self.scale)),
                    self.good_steps.assign(tf.where(grow, 0, self.good_steps + 1)),
                    self.skipped.assign(False))

        def skip():
            return tf.group(self.scale.assign(tf.maximum(self.scale / 2, 1.0)),
                            self.good_steps.assign(0), self.skipped.assign(True))

        return tf.cond(pred=finite, true_fn=apply, false_fn=skip)
