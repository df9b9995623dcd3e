"""A detectron2-shaped stand-in Mask2Former, shared by the tests (import it as `from d2_stand_in import ...`).

It has the official module paths and calling conventions of detectron2 and facebookresearch/Mask2Former, which
is all `mars_nb.taps` relies on, but is tiny, random and needs neither package:

- `MaskFormer` (mask2former/maskformer_model.py): `backbone` and `sem_seg_head`; forward(images) ->
  sem_seg_head(backbone(images)).
- `Backbone` (detectron2.modeling.Backbone): forward -> a dict res2..res5 (strides 4, 8, 16, 32) and
  `output_shape()` -> {name: `ShapeSpec`(stride, channels)}, what the taps read the strides and channels from.
  A stem, then one `BasicBlock` (detectron2.modeling.backbone.resnet) per level, widths `Backbone.WIDTHS`:
  - `ResNet`: like detectron2's ResNet with its BasicStem (7x7 stride-2 conv, 3x3 stride-2 max-pool); the class
    name makes the detectron2 layout declare its lattice 'corner' (cell j of stride s on pixel s·j + 0.5).
  - `PatchStemNet`: a 4x4 stride-4 patch stem, then the stride-2 3x3 convolutions: cell j of every level sits
    at s·j + 2 px, neither corner nor centred (from stride 8 on). Declared nowhere, so its lattice is measured
    (offset 2 px) with a UserWarning naming the class.
- `PixelDecoder` (mask2former/modeling/pixel_decoder/msdeformattn.py, MSDeformAttnPixelDecoder): no forward(),
  only forward_features(features) -> (mask_features, encoder output, multi_scale_features at strides 32, 16, 8);
  a `mask_features` 1x1 conv (conv_dim -> mask_dim), `transformer_feature_strides` and `common_stride`.
- `SemSegHead` (mask2former/modeling/meta_arch/mask_former_head.py, MaskFormerHead): calls the predictor as
  predictor(multi_scale_features, mask_features, mask), positionally or (`keywords=True`) by keywords.
- `Predictor` (mask2former/modeling/transformer_decoder/mask2former_transformer_decoder.py,
  MultiScaleMaskedTransformerDecoder): masked cross-attention over the three levels in turn; returns
  {"pred_logits": [B, Q, classes + 1], "pred_masks": [B, Q, H/4, W/4]}.
- `CrossAttentionLayer` (same file, forward_post): calls its nn.MultiheadAttention `multihead_attn` with
  keywords only and keeps [0], throwing the attention weights away.
"""
import torch
import torch.nn.functional as F
from torch import nn


class ShapeSpec:
    "Like detectron2.layers.ShapeSpec: what the taps read from `backbone.output_shape()`."
    def __init__(self, stride, channels):
        self.stride, self.channels = stride, channels


def conv_bn(cin, cout, k, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    "detectron2's BasicBlock: two 3x3 convolutions (the first strided) and a 1x1 strided shortcut."
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3)
        self.shortcut = conv_bn(cin, cout, 1, stride) if (cin, stride) != (cout, 1) else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class Backbone(nn.Module):
    "A detectron2 Backbone: a stem, then one block per level; forward -> dict res2..res5; output_shape()."
    WIDTHS = (16, 32, 64, 128)

    def __init__(self, stem: nn.Module, stem_channels: int, widths=WIDTHS):
        super().__init__()
        self.stem, self.widths = stem, tuple(widths)
        cin = stem_channels
        for i, c in enumerate(self.widths):
            setattr(self, f"res{i + 2}", BasicBlock(cin, c, 1 if i == 0 else 2))
            cin = c
        for m in self.modules():                     # detectron2's ResNet init (c2_msra_fill)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out, x = {}, self.stem(x)
        for i in range(2, 6):
            x = out[f"res{i}"] = getattr(self, f"res{i}")(x)
        return out

    def output_shape(self):
        return {f"res{i}": ShapeSpec(2 ** i, c) for i, c in zip(range(2, 6), self.widths)}


class ResNet(Backbone):
    """Like detectron2's ResNet, whose class name makes the layout declare it 'corner': its BasicStem (a 7x7
    stride-2 convolution and a 3x3 stride-2 max-pool), then strided 3x3 convolutions."""
    def __init__(self, widths=Backbone.WIDTHS):
        super().__init__(nn.Sequential(conv_bn(1, 16, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)), 16, widths)


class PatchStemNet(Backbone):
    """A 4x4 stride-4 patch stem (cell j centred on pixel 4j + 2) and stride-2 3x3 convolutions, which keep
    cell j of every level at s·j + 2: neither corner (0.5) nor centred (s/2 from stride 8 on). Declared nowhere."""
    def __init__(self, widths=Backbone.WIDTHS):
        super().__init__(nn.Sequential(nn.Conv2d(1, 16, 4, 4), nn.ReLU()), 16, widths)


class PixelDecoder(nn.Module):
    """Like MSDeformAttnPixelDecoder: no forward(); forward_features -> (mask_features, enc, multi_scale), here
    1x1 projections of the backbone maps (`input_shape`: the backbone's output_shape())."""
    def __init__(self, input_shape: dict, conv_dim=16, mask_dim=16):
        super().__init__()
        widths = [input_shape[f"res{i}"].channels for i in range(2, 6)]
        self.lateral = nn.Conv2d(widths[0], conv_dim, 1)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)   # conv_dim -> mask_dim, as in the official decoder
        self.proj = nn.ModuleList(nn.Conv2d(w, conv_dim, 1) for w in widths[1:][::-1])   # res5, res4, res3
        self.transformer_feature_strides = [8, 16, 32]
        self.common_stride = 4

    def forward_features(self, f):
        ms = [p(f[k]) for p, k in zip(self.proj, ["res5", "res4", "res3"])]      # strides 32, 16, 8
        return self.mask_features(self.lateral(f["res2"])), ms[0], ms


class CrossAttentionLayer(nn.Module):
    "Like CrossAttentionLayer.forward_post: keyword-only MHA call, weights thrown away."
    def __init__(self, c=16, heads=4):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(c, heads, dropout=0.0)
        self.norm = nn.LayerNorm(c)

    def forward(self, tgt, memory, memory_mask=None, pos=None, query_pos=None):
        tgt2 = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory,
                                   attn_mask=memory_mask, key_padding_mask=None)[0]
        return self.norm(tgt + tgt2)


class Predictor(nn.Module):
    """Like MultiScaleMaskedTransformerDecoder: called as predictor(multi_scale_features, mask_features, mask),
    returns pred_logits (K = `classes` classes + "no object") and pred_masks."""
    def __init__(self, c=16, q=6, heads=4, layers=4, classes=3):
        super().__init__()
        self.num_heads, self.num_feature_levels = heads, 3
        self.query_feat, self.query_embed = nn.Embedding(q, c), nn.Embedding(q, c)
        self.level_embed = nn.Embedding(3, c)
        self.transformer_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(c, heads) for _ in range(layers))
        self.mask_embed, self.class_embed = nn.Linear(c, c), nn.Linear(c, classes + 1)

    def forward_prediction_heads(self, out, mask_features, size):
        emb = out.transpose(0, 1)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(emb), mask_features)
        am = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        am = (am.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5).bool()
        am[torch.where(am.sum(-1) == am.shape[-1])] = False
        return self.class_embed(emb), masks, am.detach()

    def forward(self, x, mask_features, mask=None):
        assert len(x) == self.num_feature_levels
        src = [(x[i].flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1) for i in range(3)]
        pos = [torch.zeros_like(s) for s in src]
        sizes = [x[i].shape[-2:] for i in range(3)]
        B = src[0].shape[1]
        qpos = self.query_embed.weight.unsqueeze(1).repeat(1, B, 1)
        out = self.query_feat.weight.unsqueeze(1).repeat(1, B, 1)
        logits, masks, am = self.forward_prediction_heads(out, mask_features, sizes[0])
        for i, layer in enumerate(self.transformer_cross_attention_layers):
            out = layer(out, src[i % 3], memory_mask=am, pos=pos[i % 3], query_pos=qpos)
            logits, masks, am = self.forward_prediction_heads(out, mask_features, sizes[(i + 1) % 3])
        return {"pred_logits": logits, "pred_masks": masks}


class SemSegHead(nn.Module):
    """Like MaskFormerHead: pixel_decoder.forward_features, then predictor(multi_scale_features, mask_features,
    mask), positionally or (`keywords`) by keywords."""
    def __init__(self, input_shape: dict, keywords=False):
        super().__init__()
        self.pixel_decoder, self.predictor, self.keywords = PixelDecoder(input_shape), Predictor(), keywords

    def forward(self, features, mask=None):
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        if self.keywords:
            return self.predictor(x=multi_scale_features, mask_features=mask_features, mask=mask)
        return self.predictor(multi_scale_features, mask_features, mask)


class MaskFormer(nn.Module):
    "Like mask2former's MaskFormer: `backbone` and `sem_seg_head` (built from backbone.output_shape())."
    def __init__(self, backbone: nn.Module, keywords=False):
        super().__init__()
        self.backbone, self.sem_seg_head = backbone, SemSegHead(backbone.output_shape(), keywords)

    def forward(self, x):
        return self.sem_seg_head(self.backbone(x))
