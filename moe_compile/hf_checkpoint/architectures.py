"""What Mixtral and Qwen2-MoE compute (transformers 5), and how an MoELayer maps onto them exactly.

Both route the same way: logits = x W_g^T, p = softmax(logits) in fp32, the top-k experts by p, and

    MixtralSparseMoeBlock   y = sum_{i<k} (p_i / sum_j p_j) FFN_{e_i}(x)                    (always renormalised)
    Qwen2MoeSparseMoeBlock  y = sum_{i<k} g_i FFN_{e_i}(x) + sigmoid(x w_s^T) FFN_shared(x)
                            g_i = p_i / sum_j p_j if norm_topk_prob else p_i

with every FFN gated and bias-free: FFN(x) = W_down (act(W_gate x) * (W_up x)). Both are dropless. On disk
(what transformers 5 writes and what vLLM, SGLang and TensorRT-LLM read) each expert is its own set of
nn.Linear weights; transformers fuses them into [E, 2m, d] gate_up_proj tensors when it loads them:

    Mixtral    model.layers.{i}.block_sparse_moe.gate.weight [E, d]
               model.layers.{i}.block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) [m, d], w2 (down) [d, m]
    Qwen2-MoE  model.layers.{i}.mlp.gate.weight [E, d]
               model.layers.{i}.mlp.experts.{e}.gate_proj / up_proj [m, d], down_proj [d, m]
               model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj, mlp.shared_expert_gate.weight [1, d]

Our layer's always-on shared expert (added with weight 1) is written with w_s = 0 and W_down doubled:
sigmoid(0) * 2 W_down h = W_down h exactly (scaling by a power of two is exact in floating point). Without
one, shared_expert_intermediate_size is 0 and no shared-expert tensors are written (vLLM and SGLang then build
no shared expert; transformers lists the three empty tensors as missing, which changes nothing).

Attention, norms, embeddings and the LM head keep their names: LLaMA and Mistral decoder layers are Mixtral's
minus the MoE block, Qwen2's are Qwen2-MoE's (q/k/v biases included); a LLaMA model becomes Qwen2-MoE with
qkv_bias=False when it carries a shared expert, which Mixtral lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..config import MoEConfig
from ..errors import HFCheckpointError
from ..moe import MoELayer, activation_name

MIXTRAL, QWEN2_MOE = "mixtral", "qwen2_moe"
ARCHITECTURES = {MIXTRAL: "MixtralForCausalLM", QWEN2_MOE: "Qwen2MoeForCausalLM"}
SOURCE_TYPES = {"llama": MIXTRAL, "mistral": MIXTRAL, "qwen2": QWEN2_MOE}  # dense model_type -> default target
FFN_NAMES = ("gate_proj", "up_proj", "down_proj")  # the dense MLP of every source family: model.layers.{i}.mlp.*
HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}  # ours -> ACT2FN
OWN_FORMAT = "Or keep the model in moe_compile's own format: moe_compile.save(model, directory)."
_NOT_CARRIED = {"model_type", "architectures", "transformers_version", "_name_or_path", "auto_map"}


@dataclass(frozen=True)
class Routing:
    """The routing knobs that decide whether a Hugging Face MoE block computes what our layer computes."""

    routing: str
    num_experts: int
    top_k: int
    capacity_factor: Optional[float]
    normalize: bool
    combine: str

    @classmethod
    def of_config(cls, config: MoEConfig) -> "Routing":
        return cls(config.routing, config.num_experts, config.top_k, config.capacity_factor, bool(config.normalize),
                   config.combine)

    @classmethod
    def of_layer(cls, layer: MoELayer) -> "Routing":
        router = layer.router
        return cls(router.routing, router.num_experts, router.top_k, router.capacity_factor,
                   bool(getattr(router, "normalize", False)), layer.combine)

    @property
    def renormalised(self) -> bool:
        """Each chosen expert's weight is p_i / sum_j p_j (a weight of 1 is that, for top-1)."""
        return (self.combine == "weighted" and self.normalize) or (self.top_k == 1 and self.combine == "unweighted")

    def problem(self, architecture: str) -> Optional[tuple[str, str]]:
        """(what the architecture cannot express, how to convert instead), or None when it is exact."""
        hf = ARCHITECTURES[architecture]
        if self.routing == "expert_choice":
            return (f"{hf} routes each token to its top-k experts; expert_choice routing (each expert picks its "
                    "tokens) has no equivalent", "Convert with routing='token_choice'.")
        if self.capacity_factor is not None and self.capacity_factor * self.top_k < self.num_experts:
            return (f"{hf} is dropless; capacity_factor={self.capacity_factor} lets an expert drop tokens "
                    f"(capacity C < T unless capacity_factor * top_k >= num_experts)",
                    "Convert with routing='token_choice' and capacity_factor=None.")
        if self.combine == "unweighted" and self.top_k > 1:
            return (f"{hf} weights each expert's output by its gate; combine='unweighted' with top_k="
                    f"{self.top_k} adds them with weight 1", "Convert with combine='weighted'.")
        if architecture == MIXTRAL and not self.renormalised:
            return (f"{hf} renormalises the top-k gates to sum to 1 (a top-1 gate is always 1); this model "
                    f"weights experts by their unnormalised softmax probability ({self.routing}, normalize=False)",
                    "Convert with routing='token_choice' and normalize=True (the default).")
        return None


def check_routing(routing: Routing, architecture: str, where: str) -> None:
    problem = routing.problem(architecture)
    if problem:
        raise HFCheckpointError(f"{where}: cannot write {ARCHITECTURES[architecture]}: {problem[0]}. {problem[1]} "
                                f"{OWN_FORMAT}")


def choose_architecture(source: dict[str, Any], shared: bool, requested: Optional[str], where: str,
                        dense_layers: Sequence[int] = ()) -> str:
    """The target for a dense source config: Mixtral for LLaMA/Mistral (Qwen2-MoE when a shared expert or
    layers kept dense must be written), Qwen2-MoE for Qwen2, or the `requested` one; refuses source features
    the target lacks."""
    model_type = source.get("model_type")
    if model_type not in SOURCE_TYPES:
        found = f"this one is {model_type!r}" if model_type else "this one is not a transformers model"
        raise HFCheckpointError(f"{where}: writes Mixtral / Qwen2-MoE checkpoints from LLaMA, Mistral and Qwen2 "
                                f"models; {found}. {OWN_FORMAT}")
    if requested is not None and requested not in ARCHITECTURES:
        raise HFCheckpointError(f"{where}: unknown architecture {requested!r}. Choose one of "
                                f"{', '.join(ARCHITECTURES)}, or leave it unset.")
    target = requested or (QWEN2_MOE if shared or dense_layers else SOURCE_TYPES[model_type])
    problems = []
    if source.get("attention_bias") or source.get("mlp_bias"):
        problems.append("its attention or MLP projections have biases, which Mixtral's and Qwen2-MoE's "
                        "(beyond Qwen2's q/k/v biases) do not")
    if target == MIXTRAL and model_type == "qwen2":
        problems.append("Qwen2's q/k/v projections have biases, Mixtral's do not (write Qwen2-MoE instead)")
    if target == MIXTRAL and shared:
        problems.append("it has a shared expert, which Mixtral lacks (write Qwen2-MoE instead)")
    if target == MIXTRAL and dense_layers:
        problems.append(f"decoder layers {list(dense_layers)} stay dense, and every Mixtral layer is sparse (write "
                        "Qwen2-MoE instead, whose mlp_only_layers say it)")
    if target == QWEN2_MOE and model_type != "qwen2":
        head_dim = source.get("head_dim")
        if head_dim is not None and head_dim != source["hidden_size"] // source["num_attention_heads"]:
            problems.append(f"its head_dim={head_dim} differs from hidden_size / num_attention_heads, which "
                            "Qwen2-MoE assumes")
        if source.get("sliding_window") is not None:
            problems.append("its sliding-window attention is laid out differently in Qwen2-MoE")
    if problems:
        raise HFCheckpointError(f"{where}: cannot write {ARCHITECTURES[target]} from this {model_type} model: "
                                f"{'; '.join(problems)}. {OWN_FORMAT}")
    return target


@dataclass(frozen=True)
class MoEShape:
    """What config.json needs to know about the MoE layers (the same in every layer)."""

    routing: Routing
    expert_width: int
    activation: str
    shared_width: int  # 0 without a shared expert

    @classmethod
    def of_layer(cls, layer: MoELayer) -> "MoEShape":
        shared = shared_expert(layer)
        return cls(Routing.of_layer(layer), layer.expert_width, layer.activation,
                   0 if shared is None else shared.up_weight.shape[0])


def target_config(source: dict[str, Any], architecture: str, moe: MoEShape, dtype: torch.dtype,
                  load_balance_coef: float, dense_layers: Sequence[int] = ()):
    """The transformers config of the MoE checkpoint: every field the dense source shares with the target
    class (the dense MLP width among them), plus the MoE fields."""
    import transformers

    cls = getattr(transformers, ARCHITECTURES[architecture]).config_class
    known = set(cls().to_dict()) - _NOT_CARRIED
    fields = {key: value for key, value in source.items() if key in known}
    fields.update(hidden_act=HF_ACTIVATIONS[moe.activation], num_experts_per_tok=moe.routing.top_k,
                  router_aux_loss_coef=load_balance_coef, output_router_logits=False, dtype=str(dtype).split(".")[-1])
    if architecture == MIXTRAL:
        fields.update(num_local_experts=moe.routing.num_experts, intermediate_size=moe.expert_width,
                      router_jitter_noise=0.0)
    else:
        fields.update(num_experts=moe.routing.num_experts, moe_intermediate_size=moe.expert_width,
                      norm_topk_prob=moe.routing.renormalised, shared_expert_intermediate_size=moe.shared_width,
                      decoder_sparse_step=1, mlp_only_layers=list(dense_layers),
                      qkv_bias=source.get("model_type") == "qwen2")
    config = cls(**fields)
    config.architectures = [ARCHITECTURES[architecture]]
    return config


def shared_expert(layer: MoELayer):
    """The layer's always-on shared expert (`MoELayer.shared`: a gated, bias-free dense FFN with up_weight,
    gate_weight, down_weight in nn.Linear layout), or None."""
    return layer.shared


def layer_tensors(layer: MoELayer, index: int, architecture: str, where: str) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of decoder layer `index`'s MoE block, as views of the layer's parameters
    (per-expert slices of one stacked tensor share its storage without overlapping, which safetensors writes)."""
    check_routing(Routing.of_layer(layer), architecture, where)
    shared = shared_expert(layer)
    problems = []
    if not layer.gated:
        problems.append("its experts are not gated (Mixtral and Qwen2-MoE experts are down(act(gate(x)) * up(x)))")
    biases = [name for name in ("up_bias", "gate_bias", "down_bias", "output_bias") if getattr(layer, name) is not None]
    biases += [f"shared.{name}" for name in ("up_bias", "gate_bias", "down_bias")
               if shared is not None and getattr(shared, name, None) is not None]
    if biases:
        problems.append(f"it has biases ({', '.join(biases)}), the Hugging Face experts have none")
    if layer.activation not in HF_ACTIVATIONS:
        problems.append(f"its activation {activation_name(layer.activation)!r} has no transformers name")
    if layer.hidden_norm is not None:
        problems.append(f"its experts apply a hidden norm ({type(layer.hidden_norm).__name__}), the Hugging Face "
                        "experts none")
    if layer.dropout.p > 0:
        problems.append(f"its experts apply dropout p={layer.dropout.p}, the Hugging Face experts none")
    if shared is not None and getattr(shared, "gate_weight", None) is None:
        problems.append("its shared expert is not gated")
    if problems:
        raise HFCheckpointError(f"{where}: cannot write {ARCHITECTURES[architecture]}: {'; '.join(problems)}. "
                                f"{OWN_FORMAT}")

    gate, up, down = (t.detach() for t in (layer.gate_weight, layer.up_weight, layer.down_weight))
    if architecture == MIXTRAL:
        prefix = f"model.layers.{index}.block_sparse_moe"
        names = ("w1", "w3", "w2")
    else:
        prefix = f"model.layers.{index}.mlp"
        names = FFN_NAMES
    tensors = {f"{prefix}.gate.weight": layer.router.weight.detach()}
    for e in range(layer.num_experts):
        for name, weight in zip(names, (gate[e], up[e], down[e])):
            tensors[f"{prefix}.experts.{e}.{name}.weight"] = weight
    if architecture == QWEN2_MOE:
        tensors[f"{prefix}.shared_expert_gate.weight"] = gate.new_zeros(1, layer.d_model)
        if shared is not None:
            tensors.update({f"{prefix}.shared_expert.gate_proj.weight": shared.gate_weight.detach(),
                            f"{prefix}.shared_expert.up_proj.weight": shared.up_weight.detach(),
                            f"{prefix}.shared_expert.down_proj.weight": shared.down_weight.detach() * 2})
    return tensors
