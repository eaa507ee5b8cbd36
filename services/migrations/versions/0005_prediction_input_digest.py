"""predictions.input_digest: what a prediction was made from, so a fresh one can be reused

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("input_digest", sa.String(length=64), nullable=True))
        batch.create_index("ix_predictions_input_digest", ["input_digest"])


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_index("ix_predictions_input_digest")
        batch.drop_column("input_digest")
