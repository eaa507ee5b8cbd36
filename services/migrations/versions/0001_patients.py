"""patients table

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("identifier_system", sa.String(512), nullable=False),
        sa.Column("identifier_value", sa.String(256), nullable=False),
        sa.Column("resource_id", sa.String(256)),
        sa.Column("record", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("identifier_system", "identifier_value"),
    )


def downgrade() -> None:
    op.drop_table("patients")
