"""Statistics computed in separate processes merge into exactly the single-process result."""
import subprocess
import sys

import torch

import actsparse as asp

SCRIPT = """
import sys, torch, transformers as T, actsparse as asp
from actsparse.data.text import Windows
torch.manual_seed(0)
cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=50, hidden_act="relu")
model = T.LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
part = slice(*map(int, sys.argv[1].split(":")))
w = Windows(ids[part], torch.ones_like(ids[part]))
asp.profile(model, None, w, progress=False, sites="mlp").save(sys.argv[2])
"""


def test_profiles_from_two_processes_merge_exactly(tmp_path):
    for name, part in (("a", "0:1"), ("b", "1:4")):
        subprocess.run([sys.executable, "-c", SCRIPT, part, str(tmp_path / name)], check=True)
    merged = asp.Profile.load(tmp_path / "a").merge(asp.Profile.load(tmp_path / "b"))
    exec(SCRIPT.replace("sys.argv[1]", "'0:4'").replace("sys.argv[2]", repr(str(tmp_path / "whole"))), {})
    whole = asp.Profile.load(tmp_path / "whole")
    assert merged.meta["data"]["tokens"] == whole.meta["data"]["tokens"] == 64
    for name, st in whole.stats.items():
        for k, v in st.to_tensors().items():
            got = merged.stats[name].to_tensors()[k]
            if v.dtype == torch.float64:
                torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-6)  # float32 per-batch sums
            else:
                assert torch.equal(got, v), (name, k)
