# detectron2's configs/common/train.py with the recipe's lengths and periods, plus what
# d2_norms' trainer reads (seed; PreciseBN, which the BN / SyncBN cells use:
# detectron2's own tools/lazyconfig_train_net.py has no PreciseBN hook and skips it).
train = dict(
    output_dir="./output",
    init_checkpoint="",
    max_iter="${d2n_recipe:max_iter}",
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period="${d2n_recipe:checkpoint_period}", max_to_keep=100),
    eval_period="${d2n_recipe:eval_period}",
    log_period=20,
    device="cuda",
    seed=-1,
    precise_bn=dict(enabled="${d2n_recipe:precise_bn}", num_iter=200),
)
