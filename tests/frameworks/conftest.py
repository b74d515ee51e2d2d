def pytest_addoption(parser):
    parser.addoption("--framework", default="", help="jax, tensorflow, paddle or mlx: the one this process tests")
