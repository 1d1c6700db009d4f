from mobalab.bench import environment, git_commit


def test_the_caller_can_name_the_commit(monkeypatch):
    monkeypatch.setenv("MOBALAB_COMMIT", "abc1234")
    assert git_commit() == "abc1234"
    assert environment()["git_commit"] == "abc1234"


def test_the_commit_comes_from_git_otherwise(monkeypatch):
    monkeypatch.delenv("MOBALAB_COMMIT", raising=False)
    commit = git_commit()
    assert commit is None or (4 <= len(commit) <= 40 and commit.isalnum())
