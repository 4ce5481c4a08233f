"""The README's first command, shrunk: the demo runs end to end on the real default model."""
from actsparse.cli import main


def test_demo_writes_report_with_profile_and_quality(tmp_path):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--tokens", "512", "--quality-tokens", "1024",
               "--quality-methods", "cats,teal", "--decode-tokens", "8", "--no-progress"])
    assert rc == 0
    md = (out / "report.md").read_text()
    assert "Activation profile" in md and "cats" in md.lower()
    assert "Decode speed" in md and "teal 50%" in md
    for f in ("report.html", "profile/profile.json", "plots/sparsity_per_layer.png", "decode.json"):
        assert (out / f).stat().st_size > 0
