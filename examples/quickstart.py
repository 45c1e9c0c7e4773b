"""Quickstart: explain a small CNN and a tiny Llama with LRP, and print the results.

Run ``python examples/quickstart.py`` (a few seconds on a CPU; no download).
"""
from __future__ import annotations

import torch
from torch import nn

from lime_attr import LRP, available_composites


def explain_cnn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    ).eval()
    images = torch.rand(2, 3, 16, 16) * 6 - 3          # inputs in the box [-3, 3]
    labels = model(images).argmax(1)

    lrp = LRP(model, "epsilon-gamma")                  # zbox / gamma / epsilon, as zennit's EpsilonGammaBox
    relevance, delta = lrp.attribute(images, target=labels, return_convergence_delta=True)

    logits = model(images).gather(1, labels[:, None])[:, 0]
    print("CNN, composite 'epsilon-gamma'")
    print(f"  relevance shape        {tuple(relevance.shape)}")
    print(f"  explained logits       {logits.detach().numpy().round(4)}")
    print(f"  sum of relevance       {relevance.sum((1, 2, 3)).numpy().round(4)}")
    print(f"  delta (biases, eps)    {delta.numpy().round(4)}")
    heat = relevance[0].sum(0)                          # per-pixel relevance of the first image
    print(f"  most relevant pixel    {divmod(int(heat.argmax()), heat.shape[1])}")


def explain_llama() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    ids = torch.tensor([[5, 17, 42, 8, 23, 11]])
    embeddings = model.get_input_embeddings()(ids).detach()
    next_token = int(model(input_ids=ids).logits[0, -1].argmax())

    # AttnLRP; an int target is a token id explained at the last position
    relevance = LRP(model, "attnlrp").attribute(embeddings, target=next_token)
    per_token = relevance.sum(-1)[0]
    print(f"tiny Llama, composite 'attnlrp', explaining next token {next_token}")
    for pos, (tok, r) in enumerate(zip(ids[0].tolist(), per_token.tolist())):
        print(f"  position {pos}  token {tok:3d}  relevance {r:+.4f}")


if __name__ == "__main__":
    print("composites:", ", ".join(available_composites()))
    explain_cnn()
    explain_llama()
