"""Train one student attention block with the loss on the model's output: the teacher's MLM
distribution over masked tokens, through the frozen layers above the block."""
import copy
from dataclasses import dataclass, field

import torch

from sitra import fuse, models, results, runtime
from sitra.args import BlockInitArgs, check_block_init, KDArgs, StudentBlockArgs, check_kd, check_student_block, kd_field
from sitra.data.mlm import text_batches
from sitra.data.text import TextDataArgs, check_data_args
from sitra.errors import UsageError
from sitra.losses import masked_kd
from sitra.train import TrainArgs, check_train_args, train_modules

JOB = "train_block_till_end"
FUSABLE = ("block", "block_heads", "block_d_k", "block_dropout")


@dataclass(kw_only=True)
class BlockToEndArgs(TrainArgs, TextDataArgs, StudentBlockArgs, BlockInitArgs, KDArgs):
    ALPHA_MEANING = "ce_added"
    KD_DEFAULTS = (1.0, 0.0)

    temperature: float = kd_field("temperature", 1.0)
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (AdamW)"})


def check(args: BlockToEndArgs):
    check_train_args(args)
    check_data_args(args)
    check_kd(args)
    config = models.load_config(args.teacher)
    heads, d_k = check_student_block(args, config)
    check_block_init(args, config, heads)
    if not models.has_mlm_head(config):
        raise UsageError(f"--teacher {args.teacher}: block-to-end training needs a teacher with an MLM head")
    return config, heads, d_k


def default_run_name(args: BlockToEndArgs, heads: int, d_k: int) -> str:
    return f"to_end_block{args.block}_h{heads}_dk{d_k}_T{args.temperature:g}_{args.weights_name()}{args.init_name()}"


def teacher_pass(teacher):
    """prepare(batch): the teacher's hidden states (every student's block input) and its MLM
    logits at the masked positions, from one forward."""
    def prepare(batch):
        masked = batch["labels"] != -100
        with torch.inference_mode():
            out = teacher.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     output_hidden_states=True)
            return {**batch, "hidden_states": out.hidden_states, "teacher_logits": teacher.cls(out.last_hidden_state[masked])}
    return prepare


def check_fused(args_list: list[BlockToEndArgs], memory_flag: str = "--max_memory_gb"):
    shapes = [check(a) for a in args_list]
    names = [a.run_name or default_run_name(a, h, d) for a, (_, h, d) in zip(args_list, shapes)]
    fuse.check_shared(args_list, FUSABLE, names)
    args, config = args_list[0], shapes[0][0]
    # each student runs the layers above its block and the MLM head: count a teacher copy and its activations
    each = [fuse.block_student_gb(config.hidden_size, h, d, args.batch_size, args.max_seq_length)
            + fuse.teacher_gb(config, args.batch_size, args.max_seq_length) * 2 for _, h, d in shapes]
    shared = fuse.teacher_gb(config, args.batch_size, args.max_seq_length)
    fuse.check_memory(shared + sum(each), args.max_memory_gb, len(shapes), max(each), memory_flag)
    return shapes


def run(args: BlockToEndArgs):
    return run_fused([args])[0]


def run_fused(args_list: list[BlockToEndArgs]):
    """Train every student block of the list against one teacher pass per batch; returns their runs."""
    shapes = check_fused(args_list)
    args = args_list[0]
    tokenizer = models.load_tokenizer(args.teacher)
    train_batches, eval_batches = text_batches(args, tokenizer, args.batch_size, args.seed)
    runs = [results.open_run(a, default_run_name(a, h, d)) for a, (_, h, d) in zip(args_list, shapes)]
    device = runtime.pick_device(args.device)
    runtime.seed_everything(args.seed)
    teacher = models.load_model(args.teacher, device)
    students, step_losses = [], []
    for a, (config, heads, d_k) in zip(args_list, shapes):
        runtime.seed_everything(a.seed)  # each student starts as it would alone
        student = models.student_block(config, heads, d_k, a.block_dropout, a.block_init,
                                       models.encoder_layers(teacher)[a.block].attention.self)
        model = copy.deepcopy(teacher)  # frozen; only the student block in it trains
        models.replace_attention(model, a.block, student.to(device))
        students.append(student)

        def step_loss(batch, model=model, a=a):
            masked = batch["labels"] != -100
            x = batch["hidden_states"][a.block].clone()
            hidden = models.run_layers(model, x, batch["attention_mask"], start=a.block)
            return masked_kd(model.cls(hidden[masked]), batch["teacher_logits"].clone(), batch["labels"][masked],
                             a.objective())
        step_losses.append(step_loss)
    train_modules(students, JOB, runs, args, train_batches, eval_batches, step_losses, device, teacher_pass(teacher))
    return runs


ARGS = BlockToEndArgs
