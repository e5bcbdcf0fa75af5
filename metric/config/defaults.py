"""The global config: every key, its default, its meaning and its allowed values.

Each key below is preceded by a comment that says what it does and which values
it takes; ``docs/CONFIG.md`` is generated from these comments
(``python tools/gen_config_doc.py``). Key names follow the original pymetric
project so its yaml files merge unchanged.

Use :func:`load_cfg` (or ``metric.load_cfg``) to get a merged, validated copy:
defaults <- yaml file (with ``_BASE_`` inheritance) <- ``KEY VALUE`` overrides.
The merge (:mod:`metric.config.merge`) checks that every key exists (with a
did-you-mean hint) and that every value has the right type; :func:`validate`
(:mod:`metric.config.check`) then checks allowed sets, ranges and cross-key
rules. All problems raise :class:`~metric.utils.errors.ConfigError`.
"""

from yacs.config import CfgNode

_C = CfgNode()
cfg = _C

# ---------------------------------------------------------------------------- #
# Model
# ---------------------------------------------------------------------------- #
_C.MODEL = CfgNode()

# Backbone family. resnet: ResNet/ResNeXt in the pycls layout (depth from MODEL.DEPTH);
# resnest: ResNeSt (depth from MODEL.DEPTH); resnest50 | resnest101 | resnest200 | resnest269:
# ResNeSt of that depth (the original project's names); timm: any timm model (MODEL.TIMM.NAME);
# vit: CLIP's vision transformer (MODEL.WIDTH, LAYERS, PATCH_SIZE, EMB_DIM; needs
# MODEL.HEADS.POOL_LAYER identity); resnet50x1 | resnet50x2 | resnet50x4 | resnet152x1 |
# resnet152x2: wide ResNet-50/152 in the torchvision layout, stem and stages x1, x2 or x4 as wide
# (2048 x k output channels; the SimCLR family, the original project's names).
# All names are listed by `python tools/model_info.py --list` (see docs/MODEL_ZOO.md).
_C.MODEL.TYPE = "resnet"

# Backbone depth (number of layers). resnet: 18 | 34 | 50 | 101 | 152. resnest: 50 | 101 | 200 |
# 269. resnest50..resnest269 and resnet50x1..resnet152x2 take the depth from their name
# (MODEL.DEPTH must be left at 50 or agree with it). Ignored by timm.
_C.MODEL.DEPTH = 50

# Number of training classes (legacy alias of MODEL.HEADS.NUM_CLASSES; if only one of the
# two is changed from its default the other follows; if both are changed they must agree).
_C.MODEL.NUM_CLASSES = 1000

# timm backbone options (MODEL.TYPE timm; needs the optional package timm: pip install timm).
_C.MODEL.TIMM = CfgNode()

# timm model name as in timm.list_models(), optionally with a pretrained tag, e.g. resnet50,
# convnext_tiny, vit_small_patch16_224.augreg_in21k. Required for MODEL.TYPE timm.
_C.MODEL.TIMM.NAME = ""

# Load timm's pretrained weights when building (downloads them: needs network; offline, set
# TRAIN.WEIGHTS to a saved timm state dict instead). True | False.
_C.MODEL.TIMM.PRETRAINED = False

# vit (CLIP's image encoder; the original project's key names): transformer width, i.e. channels
# of every token (768 for ViT-B, 1024 for ViT-L); the attention has WIDTH / 64 heads. Integer, a
# multiple of 64. Ignored by the other backbones.
_C.MODEL.WIDTH = 768

# vit: number of residual attention blocks (12 for ViT-B, 24 for ViT-L). Integer >= 1.
_C.MODEL.LAYERS = 12

# vit: side of the square patches in pixels (32 for ViT-B/32, 16 for ViT-B/16, 14 for ViT-L/14).
# TRAIN.IM_SIZE and TEST.IM_SIZE must be multiples of it; other view sides (INFER.SCALES, the
# shorter side of images whose aspect ratio is kept) are resized up to the next multiple inside
# the backbone. Integer >= 1.
_C.MODEL.PATCH_SIZE = 32

# vit: output dimension of the image encoder (its projection `proj` is [WIDTH, EMB_DIM]; 512 for
# CLIP ViT-B, 768 for ViT-L/14); the head's MODEL.HEADS.IN_FEAT must equal it (or be 0). Integer >= 1.
_C.MODEL.EMB_DIM = 512

# Further vit options.
_C.MODEL.VIT = CfgNode()

# vit: gradient checkpointing: recompute each block's activations in the backward pass instead of
# storing them (less memory for large ViTs, about a third more training compute). True | False.
_C.MODEL.VIT.GRAD_CHECKPOINT = False

# Head: pooling -> embedding -> margin layer (the classifier used only for training).
_C.MODEL.HEADS = CfgNode()

# Head architecture. LinearHead: pool -> Linear(IN_FEAT, REDUCTION_DIM) [-> BN] -> margin layer.
# DOLGHead: DOLG (Yang et al., ICCV 2021) on the backbone's stage-3 and stage-4 maps: GeM global
# branch, attention-weighted local branch (options in MODEL.DOLG), orthogonal fusion ->
# Linear(2 * S3_DIM, REDUCTION_DIM) [-> BN] -> margin layer. POOL_LAYER does not apply (the global
# branch is GeM from GEM_P and GEM_LEARN_P); DROPOUT and BN_NECK act as in LinearHead. Needs a
# backbone with two stages (resnet, resnest*, resnet50x*, timm CNNs). See docs/MODEL_ZOO.md.
_C.MODEL.HEADS.NAME = "LinearHead"

# Number of classes of the margin layer (labels must lie in [0, NUM_CLASSES)). Integer >= 1.
_C.MODEL.HEADS.NUM_CLASSES = 1000

# Channels of the map the head pools: the backbone's last feature map (2048 for ResNet-50 and
# deeper, 512 for ResNet-18/34 at width 64, 2048 x k for resnet50xk), or the output of the
# attention block (512 with ATTENTION spatial). 0 means: take it from the model. Integer >= 0.
_C.MODEL.HEADS.IN_FEAT = 2048

# Embedding (descriptor) dimension after the reduction layer. Integer >= 1.
_C.MODEL.HEADS.REDUCTION_DIM = 512

# Global pooling of the feature map: avgpool | maxpool | gempool (generalized mean, see GEM_P) |
# avgmaxpool (average plus maximum) | identity (no pooling, for backbones that already output a
# vector [N, C] or [N, C, 1, 1]).
_C.MODEL.HEADS.POOL_LAYER = "avgpool"

# Attention block on the backbone's last feature map, before pooling (LinearHead only; not with
# POOL_LAYER identity): none | spatial (1x1 conv to 512 -> BN -> ReLU -> 1x1 conv to 1 -> softplus
# score weighting the L2-normalized 512-channel map, DELG-style; the head then pools 512
# channels) | soa (second-order non-local attention, SOLAR-style, residual; keeps the width). A
# file without VERSION (an original one) whose IN_FEAT is 512 on a ResNet with 2048 x k channels
# gets spatial (the original's *_att configs). See docs/MODEL_ZOO.md.
_C.MODEL.HEADS.ATTENTION = "none"

# Initial exponent p of gempool (p=1 is average pooling, large p approaches max pooling). Float > 0.
_C.MODEL.HEADS.GEM_P = 3.0

# Whether gempool learns p during training (True) or keeps it fixed (False).
_C.MODEL.HEADS.GEM_LEARN_P = True

# Batch norm after the embedding layer (a "BN neck"). True | False.
_C.MODEL.HEADS.BN_NECK = False

# Dropout probability applied to the pooled features before the embedding layer. Float in [0, 1).
_C.MODEL.HEADS.DROPOUT = 0.0

# Margin layer producing training logits: linear | cosface | arcface | circle | curricularface |
# subcenter_arcface | adacos. arcface: cos(theta + m) on the target class (additive angular
# margin); cosface: cos(theta) - m; circle: the classification form of Circle loss (margin m,
# scale s); curricularface: arcface's target logit plus adaptive re-weighting of hard negatives
# (the original pymetric project's "arcface"); subcenter_arcface: arcface on the best of
# SUBCENTERS centers per class; adacos: s * cos(theta), no margin, scale from ADACOS_MODE;
# linear: plain dot product. See docs/MODEL_ZOO.md.
_C.MODEL.HEADS.CLS_LAYER = "linear"

# Margin m of the margin layer (radians for arcface, subcenter_arcface and curricularface).
# MARGIN_SCHEDULE and DYNAMIC_MARGIN change it during training. Float >= 0.
_C.MODEL.HEADS.MARGIN = 0.15

# Logit scale s of the cosine margin layers. Float > 0.
_C.MODEL.HEADS.SCALE = 30.0

# arcface only: use the "easy margin" variant (no margin where cos(theta) < 0). True | False.
_C.MODEL.HEADS.EASY_MARGIN = False

# subcenter_arcface only: number K of sub-centers per class (the classifier weight is
# [NUM_CLASSES * K, REDUCTION_DIM]). Integer >= 1.
_C.MODEL.HEADS.SUBCENTERS = 3

# adacos only: adaptive (the scale is re-estimated from every training batch, starting at
# sqrt(2) ln(NUM_CLASSES - 1)) | fixed (the scale stays sqrt(2) ln(NUM_CLASSES - 1)). SCALE is
# not used by adacos; it needs NUM_CLASSES >= 3.
_C.MODEL.HEADS.ADACOS_MODE = "adaptive"

# Per-class margins from the class frequency (arcface | cosface | subcenter_arcface |
# curricularface): class c with n_c training images gets m_c = a * x_c + b, x_c = n_c ^ -LAMBDA
# (see DYNAMIC_MARGIN_NORMALIZE), replacing MARGIN. The counts come from the training list.
# True | False.
_C.MODEL.HEADS.DYNAMIC_MARGIN = False

# Dynamic margins: a. With DYNAMIC_MARGIN_NORMALIZE True it is the margin range (the rarest class
# gets a + b). Float >= 0.
_C.MODEL.HEADS.DYNAMIC_MARGIN_A = 0.45

# Dynamic margins: b. With DYNAMIC_MARGIN_NORMALIZE True it is the smallest margin (the most
# frequent class gets b). Float >= 0.
_C.MODEL.HEADS.DYNAMIC_MARGIN_B = 0.05

# Dynamic margins: exponent LAMBDA of n_c ^ -LAMBDA (0.25 in the Google Landmark 2020 recipe).
# Float > 0.
_C.MODEL.HEADS.DYNAMIC_MARGIN_LAMBDA = 0.25

# Dynamic margins: True (the published recipe) min-max scales x_c = n_c ^ -LAMBDA over the classes
# to [0, 1] before m_c = a * x_c + b, so margins span [b, a + b]; False uses m_c = a * n_c ^ -LAMBDA
# + b as it stands. True | False.
_C.MODEL.HEADS.DYNAMIC_MARGIN_NORMALIZE = True

# Margin by epoch: a list of [epoch, margin] pairs, epochs 0-based (as OPTIM.STEPS), strictly
# ascending, the first at 0, e.g. [[0, 0.1], [10, 0.2], [20, 0.3]]; [] keeps MARGIN. Set at every epoch
# start. With DYNAMIC_MARGIN every class margin is scaled by (scheduled margin / MARGIN).
_C.MODEL.HEADS.MARGIN_SCHEDULE = []

# How MARGIN_SCHEDULE is read between its epochs: step (the margin of the last pair reached) |
# linear (interpolated between neighbouring pairs; the last margin after the last pair).
_C.MODEL.HEADS.MARGIN_SCHEDULE_MODE = "step"

# Partial FC: the margin layer's class centres split over the processes (model parallel); each of
# W processes holds ceil(NUM_CLASSES / W) classes and their optimizer state, the softmax
# cross-entropy is computed across processes. See docs/TRAINING_AT_SCALE.md.
_C.MODEL.HEADS.PARTIAL_FC = CfgNode()

# Turn Partial FC on (needs cross_entropy in MODEL.LOSSES.NAME). Without a distributed launch it
# runs as one process holding every class. Checkpoints hold the full classifier either way.
# True | False.
_C.MODEL.HEADS.PARTIAL_FC.ENABLED = False

# Fraction r of each process's classes that a step uses: the positives of the global batch plus
# uniformly sampled others, max(positives, ceil(r * classes)); only they get gradient and optimizer
# updates. 1.0 uses every class (exactly the full classifier). Float in (0, 1].
_C.MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE = 1.0

# DOLG head options (MODEL.HEADS.NAME DOLGHead). The authors' config names (MODEL.S3_DIM,
# MODEL.S4_DIM, MODEL.WITH_MA) are read as these in files without VERSION.
_C.MODEL.DOLG = CfgNode()

# Channels of the backbone's stage-3 map (the local branch; also the width of the global
# descriptor fg): 1024 for ResNet-50 and deeper and for ResNeSt. Must match the backbone; 0 means:
# take it from the backbone. Integer >= 0.
_C.MODEL.DOLG.S3_DIM = 0

# Channels of the backbone's stage-4 (last) map (the global branch): 2048 for ResNet-50 and deeper
# and for ResNeSt. Must match the backbone; 0 means: take it from the backbone. Integer >= 0.
_C.MODEL.DOLG.S4_DIM = 0

# Multi-atrous module at the start of the local branch: 1x1 conv and three 3x3 convs of
# dilation 6, 12, 18 (512 channels each) plus an image-pooling branch, concatenated -> 1x1 conv
# to S3_DIM -> ReLU (the authors' MODEL.WITH_MA). True | False.
_C.MODEL.DOLG.MULTI_ATROUS = False

# Losses applied to the head's outputs.
_C.MODEL.LOSSES = CfgNode()

# Losses, summed with their SCALEs: a list of names (a single name is read as a one-element list)
# from cross_entropy (softmax cross entropy on the margin layer's logits; options under
# MODEL.LOSSES.CE) | triplet (on the embeddings within the batch; MODEL.LOSSES.TRIPLET) | circle
# (pairwise Circle loss within the batch; MODEL.LOSSES.CIRCLE). The pairwise losses need
# positives in the batch: use TRAIN.SAMPLER pk. E.g. [cross_entropy, triplet].
_C.MODEL.LOSSES.NAME = ["cross_entropy"]

# Label smoothing of cross_entropy. Float in [0, 1).
_C.MODEL.LOSSES.LABEL_SMOOTHING = 0.0

# Cross entropy options.
_C.MODEL.LOSSES.CE = CfgNode()

# Weight of cross_entropy in the total loss. Float >= 0.
_C.MODEL.LOSSES.CE.SCALE = 1.0

# Triplet loss options (distances between the embeddings of a batch).
_C.MODEL.LOSSES.TRIPLET = CfgNode()

# Margin of relu(d_p - d_n + MARGIN); not used with SOFT_MARGIN. Float >= 0.
_C.MODEL.LOSSES.TRIPLET.MARGIN = 0.3

# Use the soft margin softplus(d_p - d_n) instead of MARGIN. True | False.
_C.MODEL.LOSSES.TRIPLET.SOFT_MARGIN = False

# True: batch-hard mining (farthest positive, nearest negative of every anchor); False:
# soft-weighted mining (softmax-weighted mean distance to the positives and to the negatives).
_C.MODEL.LOSSES.TRIPLET.HARD_MINING = True

# Measure distances between L2-normalized embeddings (True) or the raw ones (False).
_C.MODEL.LOSSES.TRIPLET.NORM_FEAT = True

# Weight of triplet in the total loss. Float >= 0.
_C.MODEL.LOSSES.TRIPLET.SCALE = 1.0

# Pairwise Circle loss options (cosine similarities between the embeddings of a batch).
_C.MODEL.LOSSES.CIRCLE = CfgNode()

# Relaxation margin m (positive similarities are pushed above 1 - m, negative ones below m).
# Float >= 0.
_C.MODEL.LOSSES.CIRCLE.MARGIN = 0.25

# Scale factor gamma. Float > 0.
_C.MODEL.LOSSES.CIRCLE.GAMMA = 128.0

# Weight of circle in the total loss. Float >= 0.
_C.MODEL.LOSSES.CIRCLE.SCALE = 1.0

# ---------------------------------------------------------------------------- #
# ResNet options (pycls layout)
# ---------------------------------------------------------------------------- #
_C.RESNET = CfgNode()

# Residual block: auto (basic for depth 18/34, bottleneck otherwise) | basic_transform |
# bottleneck_transform.
_C.RESNET.TRANS_FUN = "auto"

# Number of groups of the 3x3 convolution (1 is ResNet, >1 is ResNeXt). Integer >= 1.
_C.RESNET.NUM_GROUPS = 1

# Width of each group in the first stage (64 for ResNet; 4 with 32 groups for ResNeXt-32x4d).
# Integer >= 1.
_C.RESNET.WIDTH_PER_GROUP = 64

# Bottleneck only: put the stride on the 1x1 convolution (True, MSRA) or on the 3x3 (False).
# The wide ResNets (resnet50x1..resnet152x2) always have it on the 3x3 (torchvision, SimCLR).
_C.RESNET.STRIDE_1X1 = True

# Output channels of the stem (64 for the standard ResNet; smaller for tiny models). Integer >= 1.
_C.RESNET.STEM_WIDTH = 64

# ---------------------------------------------------------------------------- #
# Batch norm
# ---------------------------------------------------------------------------- #
_C.BN = CfgNode()

# Batch norm epsilon. Float > 0.
_C.BN.EPS = 1e-5

# Batch norm momentum (PyTorch convention: weight of the new batch statistics). Float in (0, 1].
_C.BN.MOM = 0.1

# Initialize the gamma of the last BN of each residual block to zero. True | False.
_C.BN.ZERO_INIT_FINAL_GAMMA = False

# Use BN.CUSTOM_WEIGHT_DECAY (instead of OPTIM.WEIGHT_DECAY) for normalization weights, all
# biases and the GeM exponent. True | False.
_C.BN.USE_CUSTOM_WEIGHT_DECAY = False

# Weight decay for those parameters when BN.USE_CUSTOM_WEIGHT_DECAY is True (0 turns it off).
# Float >= 0.
_C.BN.CUSTOM_WEIGHT_DECAY = 0.0

# ---------------------------------------------------------------------------- #
# Optimizer and learning-rate schedule
# ---------------------------------------------------------------------------- #
_C.OPTIM = CfgNode()

# Optimizer: sgd (with OPTIM.MOMENTUM, DAMPENING, NESTEROV) | adamw (with OPTIM.BETAS).
_C.OPTIM.OPTIMIZER = "sgd"

# Base learning rate. Float > 0.
_C.OPTIM.BASE_LR = 0.1

# Learning-rate policy: cos (half cosine from BASE_LR to 0 over MAX_EPOCH) | steps
# (BASE_LR * LR_MULT ** i, i = number of entries of OPTIM.STEPS <= epoch, minus one) |
# exp (BASE_LR * GAMMA ** epoch).
_C.OPTIM.LR_POLICY = "cos"

# Decay factor per epoch of the exp policy. Float in (0, 1].
_C.OPTIM.GAMMA = 0.1

# steps policy: epochs at which a stage starts; the first entry is normally 0, e.g. [0, 30, 60, 90].
# List of numbers, ascending.
_C.OPTIM.STEPS = []

# steps policy: factor applied at each step. Float > 0.
_C.OPTIM.LR_MULT = 0.1

# Number of training epochs. Integer >= 1.
_C.OPTIM.MAX_EPOCH = 200

# SGD momentum. Float in [0, 1).
_C.OPTIM.MOMENTUM = 0.9

# SGD dampening. Float in [0, 1).
_C.OPTIM.DAMPENING = 0.0

# SGD Nesterov momentum (needs MOMENTUM > 0 and DAMPENING 0). True | False.
_C.OPTIM.NESTEROV = True

# L2 weight decay. Float >= 0.
_C.OPTIM.WEIGHT_DECAY = 5e-4

# AdamW (beta1, beta2). Two floats in [0, 1).
_C.OPTIM.BETAS = [0.9, 0.999]

# Linear warmup starts at BASE_LR * WARMUP_FACTOR and reaches the policy's value at
# WARMUP_EPOCHS. Float in (0, 1].
_C.OPTIM.WARMUP_FACTOR = 0.1

# Number of warmup epochs (0 turns warmup off). Number >= 0.
_C.OPTIM.WARMUP_EPOCHS = 0.0

# When the learning rate is updated: iter (every iteration, at the fractional epoch; equal to
# the epoch policy at every epoch start) | epoch (once per epoch, as the original project did).
_C.OPTIM.LR_UPDATE = "iter"

# Layer-wise learning-rate decay (fine-tuning): a backbone parameter at depth d of the top depth T
# gets the learning rate times LAYER_DECAY ** (T - d); the head is at T (factor 1, times
# HEAD_LR_MULT). Depths: vit: 0 for the patch embedding, class token, positional embedding and
# ln_pre, i + 1 for block i, LAYERS + 1 for ln_post and proj (T); ResNets (resnet, resnest*,
# wide ResNets): 0 for the stem, i for stage i (1..4), T = 5. 1 turns it off. Float in (0, 1].
_C.OPTIM.LAYER_DECAY = 1.0

# Learning-rate multiplier of the head (pooling, attention, embedding layer, margin layer)
# relative to the backbone. Float > 0.
_C.OPTIM.HEAD_LR_MULT = 1.0

# No weight decay on normalization layers (BN, GN, LN), biases, other parameters with one
# dimension or one element (GeM p, the class token) and positional embeddings: auto (True with
# OPTIM.OPTIMIZER adamw, False with sgd) | True | False. BN.USE_CUSTOM_WEIGHT_DECAY, when True,
# gives these parameters BN.CUSTOM_WEIGHT_DECAY instead (then this key must not be True).
_C.OPTIM.NO_DECAY_NORM_BIAS = "auto"

# Clip the gradient norm (over all parameters) to this value; 0 turns clipping off. The same
# setting as TRAIN.GRAD_CLIP (an alias): if only one of the two is set the other follows, if both
# are set they must agree. Float >= 0.
_C.OPTIM.CLIP_GRAD_NORM = 0.0

# ---------------------------------------------------------------------------- #
# Training
# ---------------------------------------------------------------------------- #
_C.TRAIN = CfgNode()

# Training data set: a folder under DATA_DIR (or an absolute path) holding the list file.
_C.TRAIN.DATASET = ""

# Training list file inside the data set folder; lines "relative/path.jpg label".
_C.TRAIN.SPLIT = "train_list.txt"

# Total mini-batch size over all processes (must be divisible by the number of processes).
# Integer >= 1.
_C.TRAIN.BATCH_SIZE = 128

# How training batches are drawn: random (shuffled images) | pk (P classes x K images per batch,
# K = TRAIN.NUM_INSTANCES, P = per-process batch / K; for the pairwise losses). With pk the
# per-process batch (BATCH_SIZE / processes) must be a multiple of NUM_INSTANCES with P >= 2.
_C.TRAIN.SAMPLER = "random"

# pk sampler: images per class in a batch (K); a class with fewer images repeats some.
# Integer >= 1.
_C.TRAIN.NUM_INSTANCES = 4

# Training crop size in pixels (square). Integer >= 8 (>= 32 for MODEL.TYPE timm; a multiple of
# MODEL.PATCH_SIZE for vit, whose positional embedding is made for this size).
_C.TRAIN.IM_SIZE = 224

# Random-resized-crop area range (fraction of the image). Two floats in (0, 1], ascending.
_C.TRAIN.CROP_SCALE = [0.25, 1.0]

# Random horizontal flip during training. True | False.
_C.TRAIN.FLIP = True

# Strength of the random brightness/contrast/saturation jitter (0 turns it off). Float in [0, 1].
_C.TRAIN.COLOR_JITTER = 0.4

# Evaluate retrieval on the TEST split every this many epochs (and always after the last one);
# 0 evaluates only at the end. Integer >= 0.
_C.TRAIN.EVAL_PERIOD = 1

# Save a checkpoint every this many epochs (and always after the last one). Integer >= 1.
_C.TRAIN.CHECKPOINT_PERIOD = 1

# Resume from the newest complete checkpoint in OUT_DIR/checkpoints if there is one. True | False.
_C.TRAIN.AUTO_RESUME = True

# Resuming with another optimizer or schedule (any OPTIM.* key except OPTIM.MAX_EPOCH, or
# TRAIN.BATCH_SIZE, TRAIN.GRAD_CLIP, TRAIN.FREEZE_BACKBONE_EPOCHS) than the checkpoint was
# trained with is refused, naming the changed keys;
# True resumes anyway and logs them. Raising OPTIM.MAX_EPOCH to train longer is always allowed.
# True | False.
_C.TRAIN.RESUME_CHANGED_CONFIG = False

# Initial weights: a checkpoint or a state dict file ("" = random initialization).
_C.TRAIN.WEIGHTS = ""

# Mixed precision on CUDA: none | bf16 | fp16 (fp16 uses gradient scaling). Ignored on CPU.
_C.TRAIN.MIXED_PRECISION = "none"

# Use the channels_last memory format for the model and inputs. True | False.
_C.TRAIN.CHANNELS_LAST = False

# Clip the gradient norm to this value (0 turns clipping off); the original project's name of
# OPTIM.CLIP_GRAD_NORM (an alias: both always hold the same value). Float >= 0.
_C.TRAIN.GRAD_CLIP = 0.0

# Keep the backbone frozen for the first this many epochs (fine-tuning a pretrained backbone: the
# head learns first): it runs in eval mode (BN statistics fixed), gets no gradients, no weight
# decay and no optimizer state; from epoch FREEZE_BACKBONE_EPOCHS + 1 on it trains with the
# schedule's learning rate. 0 turns it off. Integer >= 0.
_C.TRAIN.FREEZE_BACKBONE_EPOCHS = 0

# Gradient accumulation: one optimizer step every ACCUM_STEPS micro-batches of TRAIN.BATCH_SIZE
# images each (the effective batch is BATCH_SIZE x ACCUM_STEPS); each micro-batch's loss is
# scaled by 1 / ACCUM_STEPS, under DDP gradients are all-reduced on the last micro-batch only,
# and the learning-rate schedule, LOG_PERIOD, the ETA and the "iter" of the stats count optimizer
# steps. An epoch has ceil(batches / ACCUM_STEPS) steps (the last may have fewer micro-batches;
# its losses are scaled by 1 / its count). The sampler and the pairwise losses see one
# micro-batch at a time (batch-hard mining within BATCH_SIZE images). Integer >= 1.
_C.TRAIN.ACCUM_STEPS = 1

# Compile the model's training forward with torch.compile (opt-in). Where the platform cannot
# compile, training continues eagerly after one warning line. Checkpoints have the same keys
# as without it. True | False.
_C.TRAIN.COMPILE = False

# Keep a checkpoint of the best evaluation so far, OUT_DIR/checkpoints/best.pyth (written
# atomically, with the metric's name, value and epoch under "best"), next to the periodic ones
# (auto-resume never takes it). The metric of the TEST evaluation (higher is better): "" (off) |
# recall@1 | recall@5 | recall@10 | mAP@R | mAP@100 (Google Landmark Retrieval's definition, the
# labels as the solution). Needs TEST.DATASET. Tools take TEST.WEIGHTS best.
_C.TRAIN.BEST_METRIC = ""

# Exponential moving average (EMA) of the weights, as timm's ModelEmaV3: a float32 copy of the
# model updated after every optimizer step, ema = d * ema + (1 - d) * weights for parameters and
# floating-point buffers (BN statistics; integer buffers are copied). Saved in checkpoints
# ("ema_state"), restored on resume, used by the evaluation during training and, by default,
# by the tools that load a checkpoint holding it (TEST.WEIGHTS_KIND).
_C.TRAIN.EMA = CfgNode()

# Keep the EMA of the weights. True | False.
_C.TRAIN.EMA.ENABLED = False

# EMA decay d (the largest, reached after the warm-up). Float in (0, 1).
_C.TRAIN.EMA.DECAY = 0.9998

# Warm up the decay (timm's use_warmup): after n optimizer steps d = min(DECAY, 1 - (1 + (n - 1)
# / WARMUP_GAMMA) ** -WARMUP_POWER), so the first update copies the weights and the average
# forgets the random start quickly. False: d = DECAY from the second update on. True | False.
_C.TRAIN.EMA.WARMUP = True

# EMA warm-up: gamma of the formula above (timm's warmup_gamma). Float > 0.
_C.TRAIN.EMA.WARMUP_GAMMA = 1.0

# EMA warm-up: power of the formula above (timm's warmup_power; 2/3 suits runs of a million
# steps or more, 3/4 shorter ones, reaching 0.999 after about 10k steps). Float > 0.
_C.TRAIN.EMA.WARMUP_POWER = 0.75

# ---------------------------------------------------------------------------- #
# Testing (retrieval evaluation during training, and feature extraction)
# ---------------------------------------------------------------------------- #
_C.TEST = CfgNode()

# Test data set folder under DATA_DIR (or an absolute path); "" skips evaluation.
_C.TEST.DATASET = ""

# Test list file inside the data set folder; lines "relative/path.jpg label". Retrieval is
# evaluated among these images by label (recall@k, mAP@R).
_C.TEST.SPLIT = "val_list.txt"

# Total test batch size over all processes. Integer >= 1.
_C.TEST.BATCH_SIZE = 200

# Test-time image size, the same for evaluation during training, tools/test_metric.py, feature
# extraction and export (one preprocessing): the longer side becomes TEST.IM_SIZE times each of
# INFER.SCALES, aspect ratio kept (with INFER.CENTER_CROP: the shorter side, then a centred
# square). Integer >= 8; TEST.IM_SIZE x the smallest of INFER.SCALES must be >= 8 too (>= 32 for
# MODEL.TYPE timm). For vit a multiple of MODEL.PATCH_SIZE.
_C.TEST.IM_SIZE = 256

# Weights used by the evaluation, extraction and export tools: a weights file, best (the best
# checkpoint of a training run in OUT_DIR, OUT_DIR/checkpoints/best.pyth, see
# TRAIN.BEST_METRIC), or "" (random initialization).
_C.TEST.WEIGHTS = ""

# Which weights of a checkpoint those tools use: auto (the EMA weights when the checkpoint holds
# them, i.e. was trained with TRAIN.EMA.ENABLED, else the raw ones) | ema (the EMA weights; an
# error if there are none) | raw (the trained weights themselves). Evaluation during training
# uses the EMA weights when TRAIN.EMA.ENABLED unless this is raw.
_C.TEST.WEIGHTS_KIND = "auto"

# ---------------------------------------------------------------------------- #
# Data loader
# ---------------------------------------------------------------------------- #
_C.DATA_LOADER = CfgNode()

# Data loader worker processes per training process (0 loads in the main process). Integer >= 0;
# refused at start if the processes of a machine would start more than max(8, 4 x CPU cores).
_C.DATA_LOADER.NUM_WORKERS = 4

# Pin host memory for faster copies to the GPU. True | False.
_C.DATA_LOADER.PIN_MEMORY = True

# Check at start that every image in the list files exists (reports count and first few).
# True | False.
_C.DATA_LOADER.CHECK_FILES = True

# Largest image, in pixels (width x height read from the file's header, before decoding), that
# training, evaluation and extraction decode; a larger one (a "decompression bomb": a small file
# whose header claims e.g. 20000 x 20000) counts as unreadable: replaced by another image of its
# class in training, listed in the store's failed_images at extraction. Checked for JPEG, PNG,
# WebP, BMP, GIF and TIFF. Integer >= 0; 0 turns the check off. Default: Pillow's limit.
_C.DATA_LOADER.MAX_IMAGE_PIXELS = 89_478_485

# ---------------------------------------------------------------------------- #
# cuDNN
# ---------------------------------------------------------------------------- #
_C.CUDNN = CfgNode()

# Let cuDNN benchmark convolution algorithms (faster for fixed input sizes). True | False.
_C.CUDNN.BENCHMARK = True

# ---------------------------------------------------------------------------- #
# Inference (feature extraction)
# ---------------------------------------------------------------------------- #
_C.INFER = CfgNode()

# Number of shards the extraction input is cut into. Integer >= 1.
_C.INFER.TOTAL_NUM = 1

# Which shard to extract, 1-based (1 <= CUT_NUM <= TOTAL_NUM).
_C.INFER.CUT_NUM = 1

# What to extract: a list file (one image path per line, relative to the list's folder, an
# optional label after it is ignored) or a folder searched recursively for images.
_C.INFER.INPUT = ""

# Output feature store folder (embeddings.npy, ids.txt, meta.json).
_C.INFER.OUTPUT = ""

# Image ids: stem (file name without extension, the Kaggle convention) | relpath (path relative
# to the input, without extension).
_C.INFER.ID_MODE = "stem"

# Image scales relative to TEST.IM_SIZE (the longer side), e.g. [0.7071, 1.0, 1.4142]. Numbers > 0.
_C.INFER.SCALES = [1.0]

# Also describe the horizontally flipped image and combine it like another scale. True | False.
_C.INFER.FLIP = False

# How the L2-normalized descriptors of the scales (and flips) are combined before the final L2
# normalization: gem (signed power mean with exponent INFER.MULTISCALE_P) | mean | max
# (SuperGlobal's Scale-GeM with p = infinity, the element-wise maximum: the authors' default) |
# sgem (Scale-GeM with a finite p = INFER.MULTISCALE_P, shifted by the image's smallest value;
# the paper uses p = 10).
_C.INFER.MULTISCALE_POOL = "gem"

# Exponent of the gem (and sgem) combination of scales. Float > 0.
_C.INFER.MULTISCALE_P = 3.0

# SuperGlobal GeM+ (Shao et al., ICCV 2023): 0 keeps the head's own pooling; a value > 0 replaces
# it at test time (extraction, tools/test_metric.py, export; not evaluation during training) by
# GeM with this fixed exponent (paper: 4.6). Needs a head that pools the backbone's feature map
# (LinearHead, not identity pooling). Float >= 0.
_C.INFER.POOL_P = 0.0

# SuperGlobal Regional-GeM before the pooling, at test time like INFER.POOL_P: each feature-map
# position becomes 0.5 x + 0.5 GeM (exponent INFER.REGIONAL_GEM_P) of its INFER.REGIONAL_GEM_SIZE
# square neighbourhood (stride 1, reflection padding). True | False.
_C.INFER.REGIONAL_GEM = False

# Exponent of Regional-GeM (paper: 2.5). Float > 0.
_C.INFER.REGIONAL_GEM_P = 2.5

# Window of Regional-GeM in feature-map positions (paper: 5). Odd integer >= 1.
_C.INFER.REGIONAL_GEM_SIZE = 5

# Center-crop a square of the scaled size instead of keeping the whole image (the retrieval
# default keeps the aspect ratio and the whole image). True | False.
_C.INFER.CENTER_CROP = False

# With INFER.CENTER_CROP, the fraction of the resized image's shorter side the centred square
# keeps: the shorter side becomes round(TEST.IM_SIZE x scale / INFER.CROP_FRACTION), then the
# centred TEST.IM_SIZE x scale square is cut. 1.0 (the default) crops the whole shorter side; the
# deep-metric-learning papers' "resize 256, centre-crop 224" is TEST.IM_SIZE 224 with 0.875.
# In (0, 1]; other than 1.0 only with INFER.CENTER_CROP True.
_C.INFER.CROP_FRACTION = 1.0

# Mixed precision of extraction on CUDA: none | bf16 | fp16. Ignored on CPU.
_C.INFER.MIXED_PRECISION = "none"

# Crop the images of INFER.INPUT to boxes before extraction (the revisited Oxford/Paris query
# protocol): "" (no crop) | list (each line of the list file INFER.INPUT is "path x1 y1 x2 y2" or
# "path label x1 y1 x2 y2", pixel coordinates) | the path of a revisitop gnd_*.pkl (each image is
# cropped to the bbx of the query of qimlist with its id; an image that is not a query is an
# error). The crop is PIL's Image.crop (coordinates rounded half to even) and is scaled by the
# factor its full image would get (longer side TEST.IM_SIZE x scale x max(crop side) / max(full
# side), as cirtorch does), not blown up to the full size. Not with INFER.CENTER_CROP.
_C.INFER.BOXES = ""

# ---------------------------------------------------------------------------- #
# Distributed processes
# ---------------------------------------------------------------------------- #
_C.DIST = CfgNode()

# Seconds a process waits for its peers in a collective (all-reduce, barrier, ...) and in the
# rendezvous before it gives up with one error line naming its rank and the collective (a peer
# that died, was stopped or is stuck). Generous by default for slow GPU collectives (30 min).
# Integer in [1, 10000000] (about 116 days; torch's process group overflows or hangs beyond).
_C.DIST.TIMEOUT_S = 1800

# Without CUDA, NUM_GPUS > 1 (or torchrun --nproc_per_node) runs that many CPU processes with
# gloo; more processes than CPU cores is refused unless this is True. True | False.
_C.DIST.ALLOW_OVERSUBSCRIBE = False

# ---------------------------------------------------------------------------- #
# Logging (the progress period is LOG_PERIOD, below, as in the original project)
# ---------------------------------------------------------------------------- #
_C.LOG = CfgNode()

# Write TensorBoard event files to OUT_DIR/tb (rank 0 only): every LOG_PERIOD iterations the loss
# and each part of a combined loss, the learning rate of every parameter group, images/s, data
# time, a scheduled margin, the AdaCos scale and GPU memory; recall@k and mAP@R at each
# evaluation. View with `tensorboard --logdir OUT_DIR/tb`. A failed write (full disk, read-only
# folder) turns it off with one warning; stats.jsonl stays the record. True | False.
_C.LOG.TENSORBOARD = True

# Training images (de-normalized, with their labels) shown once in TensorBoard, from the first
# batch of a run (a resumed run adds those of its first batch); 0 shows none. Integer in [0, 64].
_C.LOG.TENSORBOARD_IMAGES = 16

# ---------------------------------------------------------------------------- #
# Misc
# ---------------------------------------------------------------------------- #

# Number of processes (one per GPU) when not launched by torchrun; >1 spawns them. Integer >= 1.
_C.NUM_GPUS = 1

# torch intra-op CPU threads of each training and extraction process: 0 (auto) = OMP_NUM_THREADS
# when the environment sets it (torchrun sets 1 for several processes unless you set it), else
# the CPU cores this process may use divided by the processes on this machine (LOCAL_WORLD_SIZE
# under torchrun, NUM_GPUS when spawned), at least 1. A value > 0 wins over OMP_NUM_THREADS.
# Logged at start. On a shared machine, processes that each use every core slow down many
# times. Integer >= 0.
_C.NUM_THREADS = 0

# Output folder: config.yaml, stats.jsonl, log.txt, checkpoints/.
_C.OUT_DIR = "output"

# File name (inside OUT_DIR) of the merged config written at start.
_C.CFG_DEST = "config.yaml"

# Random seed for Python, numpy and torch in every process. Integer in [0, 4294967295] (2^32 - 1,
# the largest seed numpy takes).
_C.RNG_SEED = 1

# Log training progress every this many iterations. Integer >= 1.
_C.LOG_PERIOD = 10

# Distributed backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo.
_C.DIST_BACKEND = "auto"

# Address of the rendezvous host when NUM_GPUS > 1 spawns processes (torchrun sets its own).
_C.HOST = "localhost"

# Port of the rendezvous host when NUM_GPUS > 1 spawns processes. Integer in [1, 65535].
_C.PORT = 10001

# Root folder of the data sets; relative paths are taken from the current folder, falling
# back to the repository root (so the default finds metric/datasets/data from anywhere).
_C.DATA_DIR = "metric/datasets/data"

# Config format version. 2 is this project; a yaml file without VERSION is taken to come from
# the original pymetric project (version 1) and is upgraded when merged (see docs/CONFIG.md:
# its CLS_LAYER "arcface" was CurricularFace in its math, so it becomes "curricularface").
_C.VERSION = 2
CURRENT_VERSION = 2

# The pristine defaults, frozen: what get_cfg() copies and what merging and validation compare a
# value with ("was this key left at its default?"). Never modified; change a copy of it.
DEFAULTS = _C.clone()
DEFAULTS.freeze()
