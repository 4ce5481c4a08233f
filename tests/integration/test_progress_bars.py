"""pplp's bisection steps and the perplexity phases show progress bars; --no-progress hides them."""
from actsparse.cli import main

PPLP = ["pplp", "--methods", "teal", "--calib-tokens", "512", "--tokens", "512", "--window", "256", "--steps", "2"]


def test_pplp_shows_a_bar_per_bisection(capsys):
    assert main(PPLP) == 0
    err = capsys.readouterr().err
    assert "perplexity, dense" in err
    assert "pplp teal" in err and "2/2" in err and "limit" in err  # one bar over the steps, with the knob


def test_pplp_no_progress_hides_the_bars(capsys):
    assert main(PPLP + ["--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "pplp teal" not in err and "perplexity, dense" not in err
