"""Recommenders on user and item embedding tables: matrix factorisation and NeuMF (GMF + MLP).

Both score (user, item) pairs and rank all items for a batch of users in bounded memory. Embedding
tables are ``RowEmbedding`` modules (an ``nn.Embedding`` whose trainable rows can be restricted per
step) so the sparse core can mask them element-wise and run a sparse backward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from fedsparse.config import ModelConfig, mlp_embedding_width
from fedsparse.sparse.row_gradients import RowEmbedding

EMBEDDING_INIT_STD = 0.1  # normal init of embedding tables, as LightGCN-PyTorch's MF
SCORE_CHUNK_ELEMENTS = 1 << 24  # bound on users x items x width floats materialised while ranking


class Recommender(nn.Module, ABC):
    """What the trainers and metrics ask of every model: scores for (user, item) pairs and for every item."""

    @abstractmethod
    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores for pairs: users int64 [b], items int64 [b] or [b, c] -> float32 [b] or [b, c]."""

    @abstractmethod
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of every item for some users: users int64 [b] -> float32 [b, n_items]."""


class EmbeddingRecommender(Recommender):
    """A recommender on embedding tables the sparse core trains: it names its tables and their penalty."""

    @abstractmethod
    def embedding_tables(self) -> dict[str, RowEmbedding]:
        """The per-user and per-item tables, by name (what sparse policies mask)."""

    @abstractmethod
    def batch_l2(self, users: torch.Tensor, *item_batches: torch.Tensor) -> torch.Tensor:
        """Half the squared L2 norm of the embeddings a batch uses, divided by the batch size."""


class MatrixFactorization(EmbeddingRecommender):
    """score(u, i) = <p_u, q_i> (+ b_u with a user bias); user table [n_users, dim], item table [n_items, dim]."""

    def __init__(self, n_users: int, n_items: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.user_embedding = RowEmbedding(n_users, dim)
        self.item_embedding = RowEmbedding(n_items, dim)
        self.user_bias: nn.Parameter | None = None  # float32 [n_users]: PFedRec's score-head bias, on devices keeping one
        for table in (self.user_embedding, self.item_embedding):
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD, generator=generator)

    @classmethod
    def from_weights(
        cls, user_weight: torch.Tensor, item_weight: torch.Tensor, user_bias: torch.Tensor | None = None
    ) -> MatrixFactorization:
        """MF on copies of given tables (float32 [n_users, dim], [n_items, dim]) and, when given, a per-user
        score bias (float32 [n_users]), skipping the random initialisation a device would overwrite at once."""
        model = cls.__new__(cls)
        EmbeddingRecommender.__init__(model)
        model.user_embedding = RowEmbedding(*user_weight.shape, _weight=user_weight.detach().clone())
        model.item_embedding = RowEmbedding(*item_weight.shape, _weight=item_weight.detach().clone())
        model.user_bias = None if user_bias is None else nn.Parameter(user_bias.detach().clone())
        return model

    def embedding_tables(self) -> dict[str, RowEmbedding]:
        """The per-user and per-item tables, by name (what sparse policies mask)."""
        return {"user": self.user_embedding, "item": self.item_embedding}

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores for pairs: users int64 [b], items int64 [b] or [b, c] -> float32 [b] or [b, c]."""
        user_vectors = self.user_embedding(users)
        item_vectors = self.item_embedding(items)
        if items.dim() == 2:
            scores = torch.einsum("bd,bcd->bc", user_vectors, item_vectors)
            return scores if self.user_bias is None else scores + self.user_bias[users][:, None]
        scores = (user_vectors * item_vectors).sum(-1)
        return scores if self.user_bias is None else scores + self.user_bias[users]

    def batch_l2(self, users: torch.Tensor, *item_batches: torch.Tensor) -> torch.Tensor:
        """Half the squared L2 norm of the embeddings a batch uses, divided by the batch size."""
        total = self.user_embedding(users).pow(2).sum()
        for items in item_batches:
            total = total + self.item_embedding(items).pow(2).sum()
        return 0.5 * total / users.shape[0]

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of every item for some users: users int64 [b] -> float32 [b, n_items]."""
        scores = self.user_embedding(users) @ self.item_embedding.weight.T
        return scores if self.user_bias is None else scores + self.user_bias[users][:, None]


def _neumf_network(dim: int, mlp_dim: int, widths: tuple[int, ...],
                   generator: torch.Generator | None) -> tuple[nn.Sequential, nn.Linear]:
    """NeuMF's shared network: the MLP tower on [mlp user; mlp item] (``widths``, ReLU after each layer) and
    the output layer on [GMF product; last hidden], Xavier-uniform weights and zero biases."""
    layers: list[nn.Module] = []
    in_width = 2 * mlp_dim
    for width in widths:
        layers += [nn.Linear(in_width, width), nn.ReLU()]
        in_width = width
    mlp, output = nn.Sequential(*layers), nn.Linear(dim + in_width, 1)
    for module in [*mlp, output]:
        if isinstance(module, nn.Linear):
            bound = (6.0 / (module.in_features + module.out_features)) ** 0.5
            nn.init.uniform_(module.weight, -bound, bound, generator=generator)
            nn.init.zeros_(module.bias)
    return mlp, output


def _fuse(mlp: nn.Sequential, output: nn.Linear, gmf_user: torch.Tensor, gmf_item: torch.Tensor,
          mlp_user: torch.Tensor, mlp_item: torch.Tensor) -> torch.Tensor:
    """NeuMF's logit from a pair's four embeddings (any leading shape): output([gmf_u * gmf_i; mlp([u; i])])."""
    hidden = mlp(torch.cat([mlp_user, mlp_item], dim=-1))
    return output(torch.cat([gmf_user * gmf_item, hidden], dim=-1)).squeeze(-1)


def _fused_scores_all(mlp: nn.Sequential, output: nn.Linear, gmf_users: torch.Tensor, mlp_users: torch.Tensor,
                      gmf_items: torch.Tensor, mlp_items: torch.Tensor) -> torch.Tensor:
    """NeuMF's logits of every item for some users, float32 [b, n_items], chunked over items.

    Same function as ``_fuse``, rearranged for ranking: the first MLP layer acts on [u; i], so its user and
    item halves are applied once per user and once per item and only added per pair, and the GMF part of
    the output layer is one matrix product. Only the deeper MLP layers run per pair.
    """
    mlp_dim = mlp_users.shape[1]
    first, deeper = mlp[0], mlp[2:]
    assert isinstance(first, nn.Linear)  # the MLP opens with a Linear layer (_neumf_network)
    user_part = mlp_users @ first.weight[:, :mlp_dim].T + first.bias  # [b, w0]
    item_part = mlp_items @ first.weight[:, mlp_dim:].T  # [n_items, w0]
    gmf_dim = gmf_items.shape[1]
    gmf_weight, hidden_weight = output.weight[0, :gmf_dim], output.weight[0, gmf_dim:]
    gmf = (gmf_users * gmf_weight) @ gmf_items.T + output.bias  # [b, n]
    chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, gmf_users.shape[0] * first.out_features))
    parts = []
    for start in range(0, item_part.shape[0], chunk):
        hidden = deeper(torch.relu(user_part[:, None, :] + item_part[None, start : start + chunk, :]))
        parts.append(hidden @ hidden_weight)
    return gmf + torch.cat(parts, dim=1)


class NeuMF(EmbeddingRecommender):
    """NeuMF (He et al. 2017): a GMF branch and an MLP branch on separate embeddings, fused linearly.

    GMF tables are [n, dim]; MLP tables are [n, widths[0] // 2] so their concatenation feeds a tower of
    ``widths``; the output layer maps [dim + widths[-1]] to one logit.
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        widths: tuple[int, ...],
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        mlp_dim = mlp_embedding_width(widths)
        self.user_embedding = RowEmbedding(n_users, dim)
        self.item_embedding = RowEmbedding(n_items, dim)
        self.user_mlp_embedding = RowEmbedding(n_users, mlp_dim)
        self.item_mlp_embedding = RowEmbedding(n_items, mlp_dim)
        for table in (self.user_embedding, self.item_embedding, self.user_mlp_embedding, self.item_mlp_embedding):
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD, generator=generator)
        self.mlp, self.output = _neumf_network(dim, mlp_dim, widths, generator)

    def embedding_tables(self) -> dict[str, RowEmbedding]:
        """The per-user and per-item tables, by name (what sparse policies mask)."""
        return {
            "user": self.user_embedding,
            "item": self.item_embedding,
            "user_mlp": self.user_mlp_embedding,
            "item_mlp": self.item_mlp_embedding,
        }

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits for pairs: users int64 [b], items int64 [b] or [b, c] -> float32 [b] or [b, c]."""
        gmf_user, mlp_user = self.user_embedding(users), self.user_mlp_embedding(users)
        gmf_item, mlp_item = self.item_embedding(items), self.item_mlp_embedding(items)
        if items.dim() == 2:
            gmf_user = gmf_user.unsqueeze(1).expand_as(gmf_item)
            mlp_user = mlp_user.unsqueeze(1).expand_as(mlp_item)
        return _fuse(self.mlp, self.output, gmf_user, gmf_item, mlp_user, mlp_item)

    def batch_l2(self, users: torch.Tensor, *item_batches: torch.Tensor) -> torch.Tensor:
        """Half the squared L2 norm of the embeddings a batch uses, divided by the batch size."""
        total = self.user_embedding(users).pow(2).sum() + self.user_mlp_embedding(users).pow(2).sum()
        for items in item_batches:
            total = total + self.item_embedding(items).pow(2).sum() + self.item_mlp_embedding(items).pow(2).sum()
        return 0.5 * total / users.shape[0]

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """Logits of every item for some users: users int64 [b] -> float32 [b, n_items], chunked over items
        (``_fused_scores_all``)."""
        return _fused_scores_all(self.mlp, self.output, self.user_embedding(users), self.user_mlp_embedding(users),
                                 self.item_embedding.weight, self.item_mlp_embedding.weight)


class JoinedNeuMF(EmbeddingRecommender):
    """NeuMF with each row's GMF and MLP embeddings side by side: user and item tables [n, dim + mlp_dim],
    columns [0, dim) the GMF embedding and [dim, dim + mlp_dim) the MLP one (mlp_dim = widths[0] // 2).

    The same function as ``NeuMF`` (same ``mlp`` and ``output`` modules, same parameter names), laid out
    as the federation stores it: a row is one unit of masks, uploads and aggregation
    (``fedsparse/federation/network.py``). ``batch_l2`` equals NeuMF's (the two tables' squares summed).
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        widths: tuple[int, ...],
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        width = dim + mlp_embedding_width(widths)
        self.user_embedding = RowEmbedding(n_users, width)
        self.item_embedding = RowEmbedding(n_items, width)
        for table in (self.user_embedding, self.item_embedding):
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD, generator=generator)
        self.mlp, self.output = _neumf_network(dim, width - dim, widths, generator)

    def embedding_tables(self) -> dict[str, RowEmbedding]:
        """The per-user and per-item tables, by name (what sparse policies mask)."""
        return {"user": self.user_embedding, "item": self.item_embedding}

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits for pairs: users int64 [b], items int64 [b] or [b, c] -> float32 [b] or [b, c]."""
        user, item = self.user_embedding(users), self.item_embedding(items)
        if items.dim() == 2:
            user = user.unsqueeze(1).expand_as(item)
        dim = self.dim
        return _fuse(self.mlp, self.output, user[..., :dim], item[..., :dim], user[..., dim:], item[..., dim:])

    def batch_l2(self, users: torch.Tensor, *item_batches: torch.Tensor) -> torch.Tensor:
        """Half the squared L2 norm of the embeddings a batch uses, divided by the batch size."""
        total = self.user_embedding(users).pow(2).sum()
        for items in item_batches:
            total = total + self.item_embedding(items).pow(2).sum()
        return 0.5 * total / users.shape[0]

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """Logits of every item for some users: users int64 [b] -> float32 [b, n_items], chunked over items."""
        user, items, dim = self.user_embedding(users), self.item_embedding.weight, self.dim
        return _fused_scores_all(self.mlp, self.output, user[:, :dim], user[:, dim:], items[:, :dim], items[:, dim:])


class MostPopular(Recommender):
    """score(u, i) = the number of training interactions of item i, the same for every user: the
    non-personalised floor every learned model must clear. No trainable parameter."""

    def __init__(self, item_counts: torch.Tensor) -> None:
        super().__init__()
        self.item_counts: torch.Tensor
        self.register_buffer("item_counts", item_counts.to(torch.float32))

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores for pairs: items int64 [b] or [b, c] -> float32 of the same shape."""
        return self.item_counts[items]

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of every item: float32 [b, n_items], one row per user, all equal."""
        return self.item_counts.expand(users.shape[0], -1)


def build_model(config: ModelConfig, n_users: int, n_items: int,
                generator: torch.Generator | None = None) -> EmbeddingRecommender:
    """The model named by ``config.name`` ("mf" or "neumf") for the given table sizes."""
    if config.name == "mf":
        return MatrixFactorization(n_users, n_items, config.dim, generator)
    if config.name == "neumf":
        return NeuMF(n_users, n_items, config.dim, config.mlp_widths, generator)
    raise ValueError(f"unknown model {config.name!r}; known: mf, neumf")
