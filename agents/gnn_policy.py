"""The GNN actor-critic for ``MaskablePPO`` on :class:`envs.NeuronPruningEnv`.

Architecture (all node-level parts are shared across nodes, so the number of parameters does not
depend on the number of neurons ``N``):

* **input**: per node, the env's static features ``x`` (clamped to ``[-clip, clip]``), the pruned
  flag and the remaining budget (broadcast), projected to ``hidden`` units;
* **encoder**: ``layers`` PyTorch-Geometric convolutions (``GCNConv``, ``SAGEConv`` or ``GATConv``,
  ``conv="gcn" | "sage" | "gat"``) with residual connections and LayerNorm, over the model's fixed
  neuron graph (``edge_index``/``edge_weight``, registered as buffers; with ``symmetric=True`` every
  edge is also used in reverse so that a neuron sees both its producers and its consumers);
* **batching**: ``B`` observations form one disjoint graph of ``B * N`` nodes (sample ``b``'s edges
  offset by ``b * N``). For GCN and SAGE this disjoint graph is stored as a block-diagonal CSR
  adjacency built in one vectorised step (cached per ``B``) and aggregated with a sparse matmul whose
  backward uses a precomputed transpose (10x faster on CPU than gather/scatter); GAT needs per-edge
  attention and uses the offset ``edge_index`` directly (slower, more memory);
* **heads**: a per-node logit from ONE shared MLP applied to every node embedding (plus a projection
  of the pooled graph context), a STOP logit and a value from the pooled graph embedding
  (mean and max over nodes). The action logits are ``[node_0 .. node_{N-1}, STOP]``; masking is
  done by sb3-contrib's ``MaskableCategoricalDistribution``.

Usage::

    from sb3_contrib import MaskablePPO
    from agents.gnn_policy import GNNMaskablePolicy, policy_kwargs_for
    model = MaskablePPO(GNNMaskablePolicy, vec_env, policy_kwargs=policy_kwargs_for(env, conv="gcn"))

Edge-weight conventions: the raw kernel-slice norms are divided by their mean. GCN uses the usual
symmetric normalisation with self-loops; SAGE uses the edge-weighted mean of the neighbours; GAT
receives the weight as a 1-d edge attribute.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Type, Union, cast

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib.common.maskable.distributions import MaskableDistribution, MaybeMasks
from sb3_contrib.common.maskable.policies import MaskableMultiInputActorCriticPolicy
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import Tensor, nn

CONVS = ("gcn", "sage", "gat")

TensorLike = Union[Tensor, Sequence, np.ndarray]


# --------------------------------------------------------------------------------------------------
# sparse aggregation with a cached transpose


class _SpMM(torch.autograd.Function):
    """``adj @ x`` whose backward is ``adj_t @ grad`` with a precomputed ``adj_t`` (CSR both)."""

    @staticmethod
    def forward(ctx: Any, adj: Tensor, adj_t: Tensor, x: Tensor) -> Tensor:
        ctx.adj_t = adj_t
        return torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[None, None, Tensor]:
        return None, None, torch.sparse.mm(ctx.adj_t, grad.contiguous())


def _spmm(adj: Tensor, x: Tensor) -> Tensor:
    adj_t = getattr(adj, "_onp_transpose", None)
    if adj_t is None:  # not one of ours: plain sparse matmul
        return torch.sparse.mm(adj, x)
    return _SpMM.apply(adj, adj_t, x)


def _csr(rows: Tensor, cols: Tensor, vals: Tensor, n: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Sorted CSR arrays (crow, col, val) of an ``n x n`` matrix given COO triplets (duplicates summed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n)).coalesce()
        csr = coo.to_sparse_csr()
    return csr.crow_indices(), csr.col_indices(), csr.values()


def _block_diagonal(crow: Tensor, col: Tensor, val: Tensor, n: int, batch: int) -> Tensor:
    """The CSR matrix of ``batch`` copies of one ``n x n`` CSR matrix on the diagonal (vectorised)."""
    nnz = col.numel()
    b = torch.arange(batch, device=col.device)
    crow_b = torch.cat(
        [
            (crow[:-1].unsqueeze(0) + b.unsqueeze(1) * nnz).reshape(-1),
            torch.tensor([batch * nnz], device=col.device, dtype=crow.dtype),
        ]
    )
    col_b = (col.unsqueeze(0) + b.unsqueeze(1) * n).reshape(-1)
    val_b = val.repeat(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow_b, col_b, val_b, size=(batch * n, batch * n))


def batch_edge_index(edge_index: Tensor, num_nodes: int, batch: int) -> Tensor:
    """``edge_index`` of ``batch`` disjoint copies of a graph: copy ``b``'s node ids offset by ``b * N``."""
    offsets = torch.arange(batch, device=edge_index.device).view(1, batch, 1) * num_nodes
    return (edge_index.unsqueeze(1) + offsets).reshape(2, -1)


# --------------------------------------------------------------------------------------------------
# PyG convolutions with the fused sparse path


def _make_conv(kind: str, dim: int, heads: int) -> nn.Module:
    from torch_geometric.nn import GATConv, GCNConv, SAGEConv

    if kind == "gcn":

        class _GCN(GCNConv):
            def message_and_aggregate(self, adj_t: Tensor, x: Tensor) -> Tensor:  # the adjacency is already normalised
                return _spmm(adj_t, x)

        return _GCN(dim, dim, normalize=False, add_self_loops=False)
    if kind == "sage":

        class _SAGE(SAGEConv):
            def message_and_aggregate(
                self, adj_t: Tensor, x: Union[Tensor, Tuple[Tensor, ...]]
            ) -> Tensor:  # row-normalised: weighted mean
                return _spmm(adj_t, x[0] if isinstance(x, tuple) else x)

        return _SAGE(dim, dim, aggr="sum")
    if kind == "gat":
        if dim % heads:
            raise ValueError(f"hidden ({dim}) must be divisible by heads ({heads}) for conv='gat'")
        return GATConv(dim, dim // heads, heads=heads, edge_dim=1, add_self_loops=True)
    raise ValueError(f"unknown conv {kind!r}; valid choices: {', '.join(CONVS)}")


def _as_edges(edge_index: TensorLike, edge_weight: Optional[TensorLike]) -> Tuple[Tensor, Tensor]:
    ei = (
        torch.as_tensor(np.asarray(edge_index) if not isinstance(edge_index, Tensor) else edge_index, dtype=torch.long)
        .detach()
        .cpu()
    )
    if ei.dim() != 2 or ei.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E); got {tuple(ei.shape)}")
    if edge_weight is None:
        ew = torch.ones(ei.shape[1])
    else:
        ew = (
            torch.as_tensor(
                np.asarray(edge_weight) if not isinstance(edge_weight, Tensor) else edge_weight, dtype=torch.float32
            )
            .detach()
            .cpu()
            .reshape(-1)
        )
    if ew.numel() != ei.shape[1]:
        raise ValueError(f"edge_weight has {ew.numel()} entries for {ei.shape[1]} edges")
    return ei, ew


class GraphEncoder(BaseFeaturesExtractor):
    """Encode a batch of env observations into node embeddings ``(B, N, H)`` and a pooled ``(B, 2H)``.

    It is the policy's features extractor: ``forward(obs)`` returns the tuple ``(nodes, pooled)``.
    """

    edge_index: Tensor  # buffers
    edge_weight: Tensor

    def __init__(
        self,
        observation_space: spaces.Dict,
        edge_index: TensorLike,
        edge_weight: Optional[TensorLike] = None,
        conv: str = "gcn",
        hidden: int = 32,
        layers: int = 2,
        heads: int = 4,
        symmetric: bool = True,
        clip: float = 10.0,
    ):
        if conv not in CONVS:
            raise ValueError(f"unknown conv {conv!r}; valid choices: {', '.join(CONVS)}")
        if hidden < 1 or layers < 0:
            raise ValueError(f"need hidden >= 1 and layers >= 0; got hidden={hidden}, layers={layers}")
        n, f = cast(spaces.Box, observation_space["x"]).shape
        super().__init__(observation_space, features_dim=2 * hidden)
        self.num_nodes, self.in_features = int(n), int(f)
        self.conv_kind, self.hidden, self.symmetric, self.clip = conv, hidden, symmetric, float(clip)
        ei, ew = _as_edges(edge_index, edge_weight)
        if ei.numel() and (ei.min() < 0 or ei.max() >= n):
            raise ValueError(f"edge_index has node ids outside [0, {n}) (the observation has {n} nodes)")
        self.register_buffer("edge_index", ei)
        self.register_buffer("edge_weight", ew)
        self.input = nn.Sequential(nn.Linear(f + 2, hidden), nn.ReLU())
        self.convs = nn.ModuleList([_make_conv(conv, hidden, heads) for _ in range(layers)])
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(layers)])
        self._cache: Dict[Tuple[int, str], Any] = {}

    # -- topology ---------------------------------------------------------------------------------
    def set_graph(self, edge_index: TensorLike, edge_weight: Optional[TensorLike] = None) -> None:
        """Use another topology with the same number of nodes (e.g. another model of the same
        architecture). Clears the cached adjacencies."""
        ei, ew = _as_edges(edge_index, edge_weight)
        if ei.numel() and (ei.min() < 0 or ei.max() >= self.num_nodes):
            raise ValueError(f"edge_index has node ids outside [0, {self.num_nodes})")
        self.edge_index = ei.to(self.edge_index.device)
        self.edge_weight = ew.to(self.edge_weight.device)
        self._cache.clear()

    def _edges(self) -> Tuple[Tensor, Tensor]:
        ei, ew = self.edge_index, self.edge_weight
        ew = ew / ew.mean().clamp_min(1e-12) if ew.numel() else ew
        if self.symmetric:
            ei, ew = torch.cat([ei, ei.flip(0)], 1), torch.cat([ew, ew])
        return ei, ew

    def _base_csr(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """CSR (crow, col, val) of the normalised ``N x N`` aggregation matrix and of its transpose."""
        key = (0, str(self.edge_index.device))
        if key not in self._cache:
            n = self.num_nodes
            ei, ew = self._edges()
            src, dst = ei[0], ei[1]
            if self.conv_kind == "gcn":  # D^-1/2 (A + I) D^-1/2, degrees over incoming weights
                loops = torch.arange(n, device=ei.device)
                src, dst = torch.cat([src, loops]), torch.cat([dst, loops])
                w = torch.cat([ew, torch.ones(n, device=ew.device)])
                deg = torch.zeros(n, device=ew.device).index_add_(0, dst, w)
                dinv = deg.pow(-0.5)
                w = dinv[src] * w * dinv[dst]
            else:  # weighted mean over incoming neighbours
                deg = torch.zeros(n, device=ew.device).index_add_(0, dst, ew)
                w = ew / deg.clamp_min(1e-12)[dst]
            self._cache[key] = _csr(dst, src, w, n) + _csr(src, dst, w, n)
        return self._cache[key]

    def adjacency(self, batch: int) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """The disjoint graph of ``batch`` copies: a block-diagonal CSR (GCN/SAGE) or the offset
        ``(edge_index, edge_attr)`` (GAT). Cached per batch size and device."""
        key = (batch, str(self.edge_index.device))
        if key in self._cache:
            return self._cache[key]
        out: Union[Tensor, Tuple[Tensor, Tensor]]
        if self.conv_kind == "gat":
            ei, ew = self._edges()
            out = (batch_edge_index(ei, self.num_nodes, batch), ew.repeat(batch).unsqueeze(1))
        else:
            crow, col, val, crow_t, col_t, val_t = self._base_csr()
            out = _block_diagonal(crow, col, val, self.num_nodes, batch)
            # read by _spmm; an attribute torch's Tensor type does not declare
            out._onp_transpose = _block_diagonal(  # type: ignore[attr-defined]
                crow_t, col_t, val_t, self.num_nodes, batch
            )
        if len(self._cache) > 6:  # a few batch sizes recur (1 for rollouts, the minibatch size for updates)
            self._cache = {k: v for k, v in self._cache.items() if k[0] == 0}
        self._cache[key] = out
        return out

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> GraphEncoder:
        # .to(device) etc.: drop cached adjacencies
        self._cache = {}
        return super()._apply(fn, *args, **kwargs)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, obs: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        x = obs["x"].float()
        if x.dim() == 2:
            x = x.unsqueeze(0)
        b, n, _ = x.shape
        if n != self.num_nodes:
            raise ValueError(f"observation has {n} nodes but the policy's graph has {self.num_nodes}")
        pruned = obs["pruned"].float().reshape(b, n, 1)
        budget = obs["budget"].float().reshape(b, 1, 1).expand(b, n, 1)
        h = self.input(torch.cat([x.clamp(-self.clip, self.clip), pruned, budget], dim=-1)).reshape(b * n, -1)
        if self.convs:
            adj = self.adjacency(b)
            for conv, norm in zip(self.convs, self.norms):
                if self.conv_kind == "gat":
                    out = conv(h, adj[0], edge_attr=adj[1])
                else:
                    out = conv(h, adj)
                h = norm(h + torch.relu(out))
        nodes = h.reshape(b, n, -1)
        pooled = torch.cat([nodes.mean(1), nodes.amax(1)], dim=-1)
        return nodes, pooled


class GraphActionHead(nn.Module):
    """Logits ``(B, N + 1)``: a shared per-node scorer on every node embedding, then STOP."""

    def __init__(self, hidden: int, head_hidden: int = 64):
        super().__init__()
        self.node = nn.Linear(hidden, head_hidden)
        self.context = nn.Linear(2 * hidden, head_hidden, bias=False)
        self.node_out = nn.Linear(head_hidden, 1)
        self.stop = nn.Sequential(nn.Linear(2 * hidden, head_hidden), nn.ReLU(), nn.Linear(head_hidden, 1))

    def forward(self, nodes: Tensor, pooled: Tensor) -> Tensor:
        z = torch.relu(self.node(nodes) + self.context(pooled).unsqueeze(1))  # (B, N, head_hidden)
        node_logits = self.node_out(z).squeeze(-1)  # (B, N): one scorer shared by all nodes
        return torch.cat([node_logits, self.stop(pooled)], dim=1)


#: how the policy weights the neuron graph's edges (:class:`GNNMaskablePolicy`'s ``edge_weights``)
EDGE_WEIGHTS = ("model", "uniform")

#: SB3 policy arguments that :class:`GNNMaskablePolicy` fixes itself (present when SB3 rebuilds
#: it from saved parameters)
_FIXED_POLICY_ARGS = (
    "net_arch",
    "features_extractor_class",
    "features_extractor_kwargs",
    "share_features_extractor",
    "ortho_init",
    "activation_fn",
)


def _check_spaces(observation_space: spaces.Dict, action_space: spaces.Discrete) -> None:
    """Refuse spaces other than the NeuronPruningEnv's: its Dict observation, N neurons + STOP actions."""
    if not isinstance(observation_space, spaces.Dict) or not {"x", "pruned", "budget"} <= set(observation_space.spaces):
        raise ValueError("GNNMaskablePolicy expects the NeuronPruningEnv Dict observation (x, pruned, budget)")
    n = cast(spaces.Box, observation_space["x"]).shape[0]
    if not isinstance(action_space, spaces.Discrete) or int(action_space.n) != n + 1:
        raise ValueError(f"expected a Discrete({n + 1}) action space (N neurons + STOP); got {action_space}")


def _check_unused(unused: Dict[str, Any]) -> None:
    """Drop the arguments this policy fixes from ``unused`` (in place); refuse any other."""
    for key in _FIXED_POLICY_ARGS:
        unused.pop(key, None)
    if unused:
        raise ValueError(f"unknown GNNMaskablePolicy argument(s) {sorted(unused)}")


class GNNMaskablePolicy(MaskableMultiInputActorCriticPolicy):
    """sb3-contrib ``MaskablePPO`` policy: GNN encoder, per-node logits + STOP, pooled value head.

    Extra keyword arguments (pass them in ``policy_kwargs``; see :func:`policy_kwargs_for`):
        edge_index: the neuron graph's ``(2, E)`` edges (tensor, array or nested list).
        edge_weight: ``(E,)`` weights (optional).
        conv: ``"gcn"``, ``"sage"`` or ``"gat"``; hidden: embedding width; layers: number of convs;
        heads: GAT heads; symmetric: also pass messages along reversed edges;
        head_hidden: width of the heads' hidden layer; clip: input feature clamp.
        edge_weights: ``"model"`` (the given ``edge_weight``) or ``"uniform"`` (every edge 1: the
            architecture's topology alone, the same for every model of it; a multi-model policy's).
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        lr_schedule: Schedule,
        edge_index: Optional[TensorLike] = None,
        edge_weight: Optional[TensorLike] = None,
        conv: str = "gcn",
        hidden: int = 32,
        layers: int = 2,
        heads: int = 4,
        symmetric: bool = True,
        head_hidden: int = 64,
        clip: float = 10.0,
        edge_weights: str = "model",
        optimizer_class: Type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: Optional[Dict[str, Any]] = None,
        **unused: Any,
    ):
        if edge_index is None:
            raise ValueError("GNNMaskablePolicy needs edge_index (pass policy_kwargs=policy_kwargs_for(env))")
        _check_spaces(observation_space, action_space)
        _check_unused(unused)
        if edge_weights not in EDGE_WEIGHTS:
            raise ValueError(f"unknown edge_weights {edge_weights!r}; valid choices: {', '.join(EDGE_WEIGHTS)}")
        self.edge_weights = edge_weights
        ei, ew = _as_edges(edge_index, self._weights(edge_weight))
        self.gnn_kwargs: Dict[str, Any] = dict(
            edge_index=ei,
            edge_weight=ew,
            conv=conv,
            hidden=int(hidden),
            layers=int(layers),
            heads=int(heads),
            symmetric=bool(symmetric),
            clip=float(clip),
        )
        self.head_hidden = int(head_hidden)
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=[],
            activation_fn=nn.ReLU,
            ortho_init=False,
            features_extractor_class=GraphEncoder,
            features_extractor_kwargs=self.gnn_kwargs,
            share_features_extractor=True,
            normalize_images=False,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
        )

    # -- construction -----------------------------------------------------------------------------
    def _build(self, lr_schedule: Schedule) -> None:
        hidden = self.gnn_kwargs["hidden"]
        # SB3 declares these as its MLP types; this policy has its own heads
        self.mlp_extractor = nn.Identity()  # type: ignore[assignment]  # unused; kept for code that expects it
        head = GraphActionHead(hidden, self.head_hidden)
        self.action_net = head
        self.value_net = nn.Sequential(
            nn.Linear(2 * hidden, self.head_hidden),
            nn.ReLU(),  # type: ignore[assignment]
            nn.Linear(self.head_hidden, 1),
        )
        stop_out = cast(nn.Linear, head.stop[-1])
        with torch.no_grad():  # start near the uniform policy over valid actions
            head.node_out.weight.mul_(0.01)
            head.node_out.bias.zero_()
            stop_out.weight.mul_(0.01)
            stop_out.bias.zero_()
        # as in SB3: Optimizer's own signature has no lr, its subclasses do
        self.optimizer = self.optimizer_class(
            self.parameters(),
            lr=lr_schedule(1),  # type: ignore[call-arg]
            **self.optimizer_kwargs,
        )

    def _get_constructor_parameters(self) -> Dict[str, Any]:
        data = BasePolicy._get_constructor_parameters(self)
        data.update(
            dict(
                lr_schedule=self._dummy_schedule,
                optimizer_class=self.optimizer_class,
                optimizer_kwargs=self.optimizer_kwargs,
                head_hidden=self.head_hidden,
                edge_weights=self.edge_weights,
                **self.gnn_kwargs,
            )
        )
        data.pop("normalize_images", None)
        return data

    @property
    def encoder(self) -> GraphEncoder:
        return self.features_extractor  # type: ignore[return-value]

    def set_graph(self, edge_index: TensorLike, edge_weight: Optional[TensorLike] = None) -> None:
        """Swap the topology (same number of nodes), e.g. to run on another model of the architecture
        (with ``edge_weights="uniform"`` the weights given are ignored)."""
        self.encoder.set_graph(edge_index, self._weights(edge_weight))

    def _weights(self, edge_weight: Optional[TensorLike]) -> Optional[TensorLike]:
        """``edge_weight`` as this policy uses it: as given, or None (every edge 1) when uniform."""
        return None if self.edge_weights == "uniform" else edge_weight

    # -- networks ---------------------------------------------------------------------------------
    def _encode(self, obs: PyTorchObs) -> Tuple[Tensor, Tensor]:
        return BasePolicy.extract_features(self, obs, self.features_extractor)  # type: ignore[return-value]

    def action_logits(self, obs: PyTorchObs) -> Tensor:
        """Raw logits ``(B, N + 1)`` (before masking) for preprocessed or raw tensor observations."""
        nodes, pooled = self._encode(obs)
        return self.action_net(nodes, pooled)

    def _dist(self, nodes: Tensor, pooled: Tensor, action_masks: MaybeMasks = None) -> MaskableDistribution:
        dist = self.action_dist.proba_distribution(action_logits=self.action_net(nodes, pooled))
        if action_masks is not None:
            dist.apply_masking(action_masks)
        return dist

    def forward(
        self, obs: PyTorchObs, deterministic: bool = False, action_masks: Optional[np.ndarray] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        nodes, pooled = self._encode(obs)
        values = self.value_net(pooled)
        dist = self._dist(nodes, pooled, action_masks)
        actions = dist.get_actions(deterministic=deterministic)
        log_prob = dist.log_prob(actions)
        return actions.reshape((-1, *(self.action_space.shape or ()))), values, log_prob

    def evaluate_actions(
        self, obs: PyTorchObs, actions: Tensor, action_masks: MaybeMasks = None
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        nodes, pooled = self._encode(obs)
        dist = self._dist(nodes, pooled, action_masks)
        return self.value_net(pooled), dist.log_prob(actions), dist.entropy()

    def get_distribution(self, obs: PyTorchObs, action_masks: MaybeMasks = None) -> MaskableDistribution:
        nodes, pooled = self._encode(obs)
        return self._dist(nodes, pooled, action_masks)

    def predict_values(self, obs: PyTorchObs) -> Tensor:
        _, pooled = self._encode(obs)
        return self.value_net(pooled)


def policy_kwargs_for(env: Any, **overrides: Any) -> Dict[str, Any]:
    """``policy_kwargs`` for :class:`GNNMaskablePolicy` from a NeuronPruningEnv (or any object with
    ``edge_index``/``edge_weight``; wrappers are unwrapped). Tensors are passed as plain lists so the
    kwargs pickle cheaply into SubprocVecEnv workers and SB3 zip files."""
    base = getattr(env, "unwrapped", env)
    ei = base.edge_index.detach().cpu().tolist() if isinstance(base.edge_index, Tensor) else base.edge_index
    ew = base.edge_weight.detach().cpu().tolist() if isinstance(base.edge_weight, Tensor) else base.edge_weight
    kwargs: Dict[str, Any] = {"edge_index": ei, "edge_weight": ew}
    kwargs.update(overrides)
    return kwargs
