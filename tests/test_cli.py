import subprocess
import sys

import tiny


def test_chat_command_answers_and_keeps_history(tmp_path):
    folder = tiny.make_checkpoint(tmp_path / "m", "llama")
    cmd = [sys.executable, "-m", "server.cli", "chat", str(folder), "--max-tokens", "4", "--max-model-len", "128"]
    one = subprocess.run(cmd + ["--prompt", "Hello"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip()
    piped = subprocess.run(cmd, input="Hello\n/reset\nHello\n/exit\nnever read\n", capture_output=True, text=True,
                           timeout=300)
    assert piped.returncode == 0, piped.stderr
    answers = piped.stdout.splitlines()[1:]
    # After /reset the same message gets the same greedy answer as the first time; /exit stops reading.
    assert len(answers) == 2 and answers[0] == answers[1] == one.stdout.strip()
