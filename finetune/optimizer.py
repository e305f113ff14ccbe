"""The training step's optimizer: --optimizer, --train-layers, --recompute and float16's loss scale.

gpt-2-simple's AccumulatingOptimizer calls compute_gradients(loss, var_list) and
apply_gradients(pairs) on the optimizer it wraps; Optimizer below answers both, so the same three
options and the loss scale cover --accumulate-gradients 1 (which calls them directly) too.
"""
import tensorflow as tf


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
